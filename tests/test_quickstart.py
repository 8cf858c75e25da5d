"""The offline quickstart end to end: real MNIST digits, the shipped quickstart CLIP, and every
CLIP prompt learner tuned on the base digits (CoOp by default, the others by a config overlay)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = {"coop": None, **{p.stem: p for p in sorted((ROOT / "configs/quickstart").glob("*.yaml"))}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OVERLAYS))
def test_quickstart_tuned_beats_zero_shot_on_base(method: str, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_DATA", str(data_root))
    run = tmp_path / "run"
    overlay = ["--config", str(OVERLAYS[method])] if OVERLAYS[method] else []
    main(
        [
            "fit",
            "--config", str(ROOT / "configs/quickstart.yaml"), *overlay,
            "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    reports = list(run.rglob("base_new_report.json"))
    assert len(reports) == 1
    rows = json.loads(reports[0].read_text())
    zero, tuned = rows["zero-shot CLIP"], rows[f"tuned ({method})"]
    for row in (zero, tuned):
        assert set(row) == {"base", "new", "hm"}
        assert 0 <= row["base"] <= 100 and 0 <= row["new"] <= 100
    assert zero["base"] > 40, "the shipped quickstart CLIP must be aligned (zero-shot far above 20% chance)"
    assert tuned["base"] > zero["base"], rows
