"""Issue 6 on the offline quickstart: the visual prompt learners against their no-prompt baselines on
the shipped quickstart CLIP's pretrained image tower, run through the CLI (``vlm fit`` + ``vlm test``).

* TCPA through :class:`~vlm.modules.ViTClassifier` vs the linear probe (same frozen tower, data,
  optimiser and schedule) on MNIST-Location, the VTAB-structured-style quadrant task built from the
  quickstart digits (1,000 train images, 1,000 held-out test images).
* KTPP through :class:`~vlm.modules.EpisodicClassifier` vs the cosine-prototype baseline on the
  frozen features: meta-trained on zero..four, tested on 5-way episodes of five..nine.

The settings and the measured numbers are in the configs' headers (configs/quickstart/vit/,
configs/quickstart/fsl/).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from vlm.runtime.cli import main
from vlm.metrics import mean_ci95

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "configs/quickstart/vit"
FSL = ROOT / "configs/quickstart/fsl"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: MNIST-Location epochs in the suite: the 30-epoch budget the configs' headers also measured, half
#: the 60 a user runs, to keep the suite within its time (2026-12-06 through this test: probe 61.4 %,
#: TCPA 63.5 %; 4.5 min instead of 9.6 for both runs)
EPOCHS = 30


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist")


def fit_and_test(config: Path, run: Path, overrides: Optional[list[str]] = None, fit: bool = True) -> dict:
    """``vlm fit`` then ``vlm test`` on the last checkpoint (or ``vlm test`` alone); the test metrics."""
    overrides = list(overrides or [])
    ckpt = []
    if fit:
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run / "fit"), *QUIET, *overrides])
        ckpts = sorted((run / "fit").rglob("*.ckpt"))
        assert ckpts, "fit must write a checkpoint"
        ckpt = ["--ckpt_path", str(ckpts[-1])]
    main(["test", "--config", str(config), "--trainer.default_root_dir", str(run / "test"), *QUIET, *overrides, *ckpt])
    results = list((run / "test").rglob("results.json"))
    assert len(results) == 1
    return json.loads(results[0].read_text())


@pytest.mark.slow
def test_tcpa_beats_the_linear_probe(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MNIST-Location (where is the digit?): the frozen tower was pretrained to name digits, and its
    pooled feature holds their position only weakly; TCPA's prompts re-route CLS attention in every
    layer. On the digit task itself the shipped tower leaves nothing to adapt: TCPA ties the probe
    there (configs/quickstart/vit/tcpa.yaml has that negative result and its causes)."""
    monkeypatch.setenv("VLM_DATA", str(data_root))
    budget = ["--trainer.max_epochs", str(EPOCHS)]
    probe = fit_and_test(VIT / "location_linear_probe.yaml", tmp_path / "probe", budget)
    tcpa = fit_and_test(VIT / "location_tcpa.yaml", tmp_path / "tcpa", budget)
    assert probe["method"] == "linear" and tcpa["method"] == "tcpa"
    p, t = probe["metrics"]["test/acc_all"], tcpa["metrics"]["test/acc_all"]
    assert 25.0 < p < 100.0, "the probe must be above 25 % (4-way chance)"
    assert t > p, f"TCPA {t:.2f} % vs linear probe {p:.2f} % on the held-out MNIST-Location images"


@pytest.mark.slow
def test_ktpp_beats_the_prototype_baseline(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_DATA", str(data_root))
    base = fit_and_test(FSL / "prototype.yaml", tmp_path / "prototype", fit=False)  # nothing to train
    ktpp = fit_and_test(FSL / "ktpp.yaml", tmp_path / "ktpp")
    assert base["method"] == "prototype" and ktpp["method"] == "ktpp"
    b, k = base["metrics"], ktpp["metrics"]
    assert b["test/episodes"] == k["test/episodes"] == 300.0  # the same fixed test episodes
    assert 20.0 < b["test/acc"] < 100.0, "the frozen features must be far above 20 % (5-way chance)"
    assert k["test/acc"] > b["test/acc"], f"KTPP {k['test/acc']:.2f} +- {k['test/ci95']:.2f} vs prototypes {b['test/acc']:.2f} +- {b['test/ci95']:.2f}"
    # Paired over the same episodes (results.json keeps each episode's accuracy, in test order).
    eb, ek = base["model"]["episode_acc"], ktpp["model"]["episode_acc"]
    assert len(eb) == len(ek) == 300
    assert abs(sum(eb) / 300 - b["test/acc"]) < 1e-3 and abs(sum(ek) / 300 - k["test/acc"]) < 1e-3
    gain, ci = mean_ci95([x - y for x, y in zip(ek, eb)])
    print(f"KTPP - prototypes, paired over 300 episodes: {gain:+.2f} +- {ci:.2f}")
    assert gain - ci > 0.0, "the paired 95 % interval of KTPP's gain must exclude zero"
