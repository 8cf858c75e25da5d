"""The README's CLI path to a tiny random LLaVA (no 7B weights), run through `vlm test`, and the
answer-file error that names the accepted keys (issue 24 item 7)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.llava.tiny import TINY_LLAVA_CONFIG, save_tiny_processor, write_tiny_pope
from vlm.runtime.cli import main

REPO = Path(__file__).resolve().parents[2]
BACKBONE_FLAG = "--model.init_args.backbone"


def readme_command() -> list[str]:
    """The README's `vlm test` command for a tiny random LLaVA (its one block that sets a backbone config)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if f"{BACKBONE_FLAG} '" in b]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["vlm", "test"], argv[:2]
    return argv[1:]


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def test_readme_tiny_llava_config_matches_the_llava15_processor() -> None:
    """The README's random model: 576 patches of 14 px at 336 px and LLaVA-1.5's vocabulary and image token."""
    from transformers import LlavaConfig

    backbone = yaml.safe_load(_value(readme_command(), BACKBONE_FLAG))["init_args"]
    assert backbone["model"] is None and backbone["processor"] == "llava-hf/llava-1.5-7b-hf"
    cfg = backbone["config"]
    vision = cfg["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == cfg["image_seq_length"] == 576
    assert cfg["image_token_index"] == 32000 and cfg["text_config"]["vocab_size"] == 32064
    built = LlavaConfig(**cfg)
    assert built.text_config.hidden_size == 32 and built.vision_config.num_hidden_layers == 2


@pytest.fixture(scope="module")
def pope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pope")
    write_tiny_pope(root, (40, 48))
    save_tiny_processor(root / "processor")
    return root


def test_readme_tiny_llava_command_evaluates(pope: Path, tmp_path: Path) -> None:
    """The README's command, with the local tiny processor (and the tiny config that matches it)
    instead of the hub's, and the POPE files of the fixture."""
    argv = readme_command()
    backbone = yaml.safe_load(_value(argv, BACKBONE_FLAG))
    backbone["init_args"].update(processor=str(pope / "processor"), config=TINY_LLAVA_CONFIG)
    for flag, value in (
        (BACKBONE_FLAG, json.dumps(backbone)),
        ("--data.init_args.question_file", str(pope / "questions.jsonl")),
        ("--data.init_args.image_folder", str(pope)),
        ("--data.init_args.answers_file", str(pope / "labels.jsonl")),
        ("--data.init_args.batch_size", "2"),
        ("--trainer.default_root_dir", str(tmp_path / "run")),
        ("--trainer.enable_progress_bar", "false"),
    ):
        argv = _set(argv, flag, value)
    argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
    main(argv)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"test/pope_acc", "test/pope_f1", "test/visual_tokens"} <= set(results["metrics"])
    assert results["metrics"]["test/visual_tokens"] == 16 and results["dataset"] == "pope"


def test_answer_file_error_names_the_accepted_keys(pope: Path, tmp_path: Path) -> None:
    from vlm.datamodules.vqa import VQAQuestions

    bad = tmp_path / "answers.jsonl"
    bad.write_text("\n".join(json.dumps({"question_id": i, "gold": "yes"}) for i in range(4)))
    with pytest.raises(ValueError, match=r"question 0 has no answer.*Accepted answer keys.*'answers', 'answer', 'label'"):
        VQAQuestions(str(pope / "questions.jsonl"), str(pope), str(bad))
