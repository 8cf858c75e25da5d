"""A tiny random LLaVA-1.5 (no download) as one `vlm test` model config on local files, and a tiny
POPE-style eval set of random 32-px images, shared by the compare and kept-picture tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.llava.tiny import TINY_LLAVA_CONFIG, save_tiny_processor, write_tiny_pope

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llava_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model`` (a model config: configs/llava/llava15_7b.yaml's module with the tiny random model and
    a local processor), ``data`` (a POPE data config on 4 local images), ``root``."""
    root = tmp_path_factory.mktemp("tiny_llava")
    write_tiny_pope(root, (32, 32))
    processor = save_tiny_processor(root / "processor")
    base = yaml.safe_load((REPO / "configs/llava/llava15_7b.yaml").read_text())
    backbone = base["model"]["init_args"]["backbone"]["init_args"]
    backbone.update(model=None, processor=processor, dtype="float32", config=TINY_LLAVA_CONFIG)
    base["model"]["init_args"]["max_new_tokens"] = 2
    base["trainer"].update(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    (root / "model.yaml").write_text(yaml.safe_dump(base))
    data = yaml.safe_load((REPO / "configs/llava/data/pope.yaml").read_text())
    data["data"]["init_args"].update(question_file=str(root / "questions.jsonl"), image_folder=str(root),
                                     answers_file=str(root / "labels.jsonl"), batch_size=2)
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return {"root": root, "model": root / "model.yaml", "data": root / "data.yaml"}
