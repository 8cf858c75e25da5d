"""The offline quickstart end to end: real MNIST digits, the shipped quickstart CLIP, CoOp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_tuned_beats_zero_shot_on_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    main(
        [
            "fit",
            "--config", str(ROOT / "configs/quickstart.yaml"),
            "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    reports = list(run.rglob("base_new_report.json"))
    assert len(reports) == 1
    rows = json.loads(reports[0].read_text())
    zero, tuned = rows["zero-shot CLIP"], rows["tuned (coop)"]
    for row in (zero, tuned):
        assert set(row) == {"base", "new", "hm"}
        assert 0 <= row["base"] <= 100 and 0 <= row["new"] <= 100
    assert zero["base"] > 30, "the shipped quickstart CLIP must be aligned (zero-shot far above 20% chance)"
    assert tuned["base"] > zero["base"], rows
