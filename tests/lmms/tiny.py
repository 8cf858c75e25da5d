"""The tiny task's data for `vlm test` and the tiny model's configs, shared by tests/lmms."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from tests.llava.tiny import TINY_LLAVA_CONFIG, save_tiny_processor

TASKS = Path(__file__).resolve().parent / "tasks"
TASK = "vlm_tiny_pope"


def task_docs() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (TASKS / "tiny_pope.jsonl").read_text().splitlines() if line.strip()]


def write_vqa_files(root: Path) -> None:
    """The task's documents as LLaVA-format files for `VQADataModule`: the same images (PNG, lossless)
    and questions, answers on the question lines."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_task_utils", TASKS / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)  # type: ignore[union-attr]
    lines = []
    for doc in task_docs():
        names = []
        for seed in doc["seeds"]:
            utils.make_image(seed).save(root / f"{seed}.png")
            names.append(f"{seed}.png")
        lines.append({"question_id": doc["question_id"], "image": names if len(names) > 1 else names[0],
                      "text": doc["question"], "answer": doc["answer"], "category": doc["category"]})
    (root / "questions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))


def save_newline_processor(path: Path) -> str:
    """`tests.llava.tiny.save_tiny_processor` with a newline token (two images per question)."""
    return save_tiny_processor(path, newline=True)


def varied_llava_config() -> dict:
    """The tiny LLaVA with weights of std 1, so greedy answers differ between questions."""
    cfg = copy.deepcopy(TINY_LLAVA_CONFIG)
    cfg["text_config"]["initializer_range"] = cfg["vision_config"]["initializer_range"] = 1.0
    return cfg


def write_vlm_config(root: Path, pruner: Optional[dict] = None, batch_size: int = 2) -> Path:
    """A `vlm test` YAML: the tiny LLaVA (seeded, so every build has the same weights), the task's files."""
    init: dict[str, Any] = {
        "backbone": {"class_path": "vlm.backbones.LlavaBackbone",
                     "init_args": {"config": varied_llava_config(), "processor": str(root / "processor"), "dtype": "float32"}},
        "max_new_tokens": 4,
    }  # fmt: skip
    if pruner is not None:
        init["pruner"] = pruner
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": "vlm.modules.llava_eval.LlavaEval", "init_args": init},
        "data": {"class_path": "vlm.datamodules.vqa.VQADataModule",
                 "init_args": {"question_file": str(root / "questions.jsonl"), "image_folder": str(root), "metric": "pope",
                               "dataset": TASK, "batch_size": batch_size}},
        "trainer": {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root / "run")},
    }  # fmt: skip
    path = root / "vlm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
