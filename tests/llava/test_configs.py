"""Every shipped LLaVA config composes and validates through the CLI parser (nothing is built), and
so does every registered pruner, named by its short name in a fragment written here
(``check_pruner_composes``: a new pruner composes with no edit here and no shipped fragment)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm import pruning
from vlm.registry import import_path
from vlm.runtime.cli import parse_configs

ROOT = Path(__file__).resolve().parents[2] / "configs" / "llava"
PRUNERS = sorted((ROOT / "pruner").glob("*.yaml"))
DATA = sorted((ROOT / "data").glob("*.yaml"))


BUDGET = "--model.init_args.pruner.init_args.num_tokens"


def check_pruner_composes(name: str, folder: Path, budget: int = 64) -> None:
    """A fragment ``pruner: {class_path: <name>}`` composes with the LLaVA-1.5 model and a data
    config through the CLI parser, resolves to the registered class, and takes a budget override."""
    fragment = folder / f"{name}.yaml"
    fragment.write_text(yaml.safe_dump({"model": {"init_args": {"pruner": {"class_path": name}}}}))
    cfg = parse_configs([ROOT / "llava15_7b.yaml", fragment, DATA[0]], [BUDGET, str(budget)])
    init = cfg.model.init_args
    assert init.pruner.class_path == import_path(pruning.PRUNERS.get(name)), "the short name is the registered class"
    assert init.pruner.init_args.num_tokens == budget


@pytest.mark.parametrize("name", pruning.available())
def test_every_registered_pruner_composes_by_its_short_name(name, tmp_path):
    check_pruner_composes(name, tmp_path)


def test_every_shipped_fragment_is_named_for_a_registered_pruner():
    """configs/llava/pruner/<name>.yaml configures the pruner registered as <name> (fragments are
    recipes; a pruner needs none to compose, as the test above shows)."""
    assert PRUNERS and {p.stem for p in PRUNERS} <= set(pruning.available())
    for path in PRUNERS:
        assert yaml.safe_load(path.read_text())["model"]["init_args"]["pruner"]["class_path"] == path.stem


@pytest.mark.parametrize("budget", [192, 128, 64])
@pytest.mark.parametrize("pruner", PRUNERS, ids=lambda p: p.stem)
def test_pruner_configs_compose_with_a_budget_override(pruner, budget):
    cfg = parse_configs([ROOT / "llava15_7b.yaml", pruner, DATA[0]], [BUDGET, str(budget)])
    init = cfg.model.init_args
    assert init.pruner.class_path == import_path(pruning.PRUNERS.get(pruner.stem)), "the short name is the registered class"
    assert init.pruner.init_args.num_tokens == budget
    assert init.backbone.init_args.model == "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize("data", DATA, ids=lambda p: p.stem)
def test_data_configs_compose(data):
    cfg = parse_configs([ROOT / "llava15_7b.yaml", data])
    assert cfg.data.init_args.metric in ("vqa", "gqa", "pope", "mc")
