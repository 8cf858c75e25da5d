"""Every shipped LLaVA config composes and validates through the CLI parser (nothing is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.runtime.cli import parse_configs

ROOT = Path(__file__).resolve().parents[2] / "configs" / "llava"
PRUNERS = sorted((ROOT / "pruner").glob("*.yaml"))
DATA = sorted((ROOT / "data").glob("*.yaml"))


BUDGET = "--model.init_args.pruner.init_args.num_tokens"


def test_one_fragment_per_registered_pruner():
    from vlm.pruning.registry import PRUNERS as REGISTERED

    assert [p.stem for p in PRUNERS] == sorted(n for n in REGISTERED.available() if n != "random")


@pytest.mark.parametrize("budget", [192, 128, 64])
@pytest.mark.parametrize("pruner", PRUNERS, ids=lambda p: p.stem)
def test_pruner_configs_compose_with_a_budget_override(pruner, budget):
    cfg = parse_configs([ROOT / "llava15_7b.yaml", pruner, DATA[0]], [BUDGET, str(budget)])
    init = cfg.model.init_args
    assert init.pruner.class_path.rsplit(".", 1)[-1] == pruner.stem
    assert init.pruner.init_args.num_tokens == budget
    assert init.backbone.init_args.model == "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize("data", DATA, ids=lambda p: p.stem)
def test_data_configs_compose(data):
    cfg = parse_configs([ROOT / "llava15_7b.yaml", data])
    assert cfg.data.init_args.metric in ("vqa", "gqa", "pope", "mc")
