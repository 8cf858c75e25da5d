"""`vlm test` / `vlm predict` of a tiny random LLaVA on 2 CPU processes (gloo, `strategy: ddp`) give
the 1-process metrics and answers: the VQA loader's sampler is unpadded (each of the 5 questions is
answered once, on one rank) and `LlavaEval` gathers every rank's records before reducing. The
1-process runs go in this process (`strategy: auto`), the 2-process ones in a subprocess (Lightning's
launcher starts the second rank)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed.helpers import REPO, base_env
from tests.llava.tiny import TINY_LLAVA_CONFIG, save_tiny_processor, write_tiny_pope

COUNT = 5  # odd: a padding sampler would answer one question twice on 2 ranks


def varied_llava_config() -> dict:
    """The tiny LLaVA with weights of std 1: its greedy answers differ between questions (at the default
    0.02 every question gets the same answer, which would make a per-sample comparison toothless)."""
    cfg = copy.deepcopy(TINY_LLAVA_CONFIG)
    cfg["text_config"]["initializer_range"] = cfg["vision_config"]["initializer_range"] = 1.0
    return cfg


def write_llava_config(root: Path, run_dir: Path) -> Path:
    """One YAML for every world size (only `--trainer.devices` changes): tiny LLaVA, local POPE files."""
    cfg = {
        "seed_everything": 0,  # every rank builds the same random weights
        "model": {
            "class_path": "vlm.modules.llava_eval.LlavaEval",
            "init_args": {
                "backbone": {"class_path": "vlm.backbones.LlavaBackbone",
                             "init_args": {"config": varied_llava_config(), "processor": str(root / "processor"), "dtype": "float32"}},
                "max_new_tokens": 4,
            },
        },
        "data": {
            "class_path": "vlm.datamodules.vqa.VQADataModule",
            "init_args": {"question_file": str(root / "questions.jsonl"), "image_folder": str(root),
                          "answers_file": str(root / "labels.jsonl"), "metric": "pope", "dataset": "pope", "batch_size": 2},
        },
        "trainer": {"accelerator": "cpu", "strategy": "ddp", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run_dir)},
    }  # fmt: skip
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_vlm(subcommand: str, config: Path, devices: int) -> None:
    if devices == 1:
        from vlm.runtime.cli import main

        main([subcommand, "--config", str(config), "--trainer.strategy", "auto"])
        return
    cmd = [sys.executable, "-m", "vlm.runtime.cli", subcommand, "--config", str(config), "--trainer.devices", str(devices)]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("llava_ddp")
    data = tmp / "pope"
    data.mkdir()
    write_tiny_pope(data, (40, 48), count=COUNT)
    save_tiny_processor(data / "processor")
    out = {}
    for world in (1, 2):
        run_dir = tmp / f"w{world}"
        config = write_llava_config(data, run_dir)
        run_vlm("test", config, world)
        run_vlm("predict", config, world)
        answers = [json.loads(line) for f in sorted(run_dir.glob("predictions*.jsonl")) for line in f.read_text().splitlines()]
        out[world] = {"results": json.loads((run_dir / "results.json").read_text()), "answers": answers}
    return out


def test_two_processes_report_the_one_process_metrics(runs: dict[int, dict]) -> None:
    one, two = runs[1]["results"]["metrics"], runs[2]["results"]["metrics"]
    timings = {"test/prefill_ms", "test/decode_ms_per_token"}
    assert {"test/pope_acc", "test/pope_f1", "test/pope_yes_ratio", "test/pope_acc/random", "test/visual_tokens"} <= set(one)
    assert set(one) == set(two)
    assert {k: v for k, v in two.items() if k not in timings} == {k: v for k, v in one.items() if k not in timings}
    assert one["test/visual_tokens"] == 16
    assert all(two[k] > 0 for k in timings)


def test_two_processes_answer_every_question_once_as_one_does(runs: dict[int, dict]) -> None:
    one, two = runs[1]["answers"], runs[2]["answers"]
    assert [a["question_id"] for a in one] == list(range(COUNT))
    assert sorted(a["question_id"] for a in two) == list(range(COUNT))  # no duplicate, none missing
    assert sorted(two, key=lambda a: a["question_id"]) == one
    assert len({a["text"] for a in one}) > 1  # the answers differ between questions: the check has teeth
