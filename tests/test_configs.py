"""Every YAML under configs/ parses and validates against the code (class paths, keys, types).

Fragments compose like the READMEs say: a file outside ``configs/experiments`` without a model
``class_path`` is parsed after the default backbone fragment, one without a data ``class_path``
after the default data fragment. The experiment recipes are fragments by design: they are parsed in
the stacks ``configs/experiments/README.md`` documents (``STACKS``), and every file there must be in
one. The schedule table of that README is checked against the composed recipes, and every TCPA
stack against the released TCPA schedule. Every registered prompt learner composes by its short
name in a fragment written here (``check_learner_composes``: a new learner needs no edit here).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vlm import prompts
from vlm.registry import import_path
from vlm.runtime.cli import parse_configs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs/experiments"
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if EXPERIMENTS not in p.parents)
DEFAULT_MODEL = ROOT / "configs/backbone/clip_vit_b16.yaml"
DEFAULT_DATA = ROOT / "configs/data/oxford_pets.yaml"

CLIP = ["configs/backbone/clip_vit_b16.yaml", "configs/trainer/default.yaml"]
VIT = ["configs/backbone/vit_b16_in21k.yaml", "configs/trainer/default.yaml"]
B2N = ["configs/data/oxford_pets.yaml", "protocols/base2new"]
XD = ["configs/data/imagenet.yaml", "protocols/all_classes"]
FEW = ["configs/data/dtd.yaml", "protocols/all_classes"]
#: The documented compositions (configs/experiments/README.md); ``m/f`` is configs/experiments/m/f.yaml.
STACKS = {
    "coop-b2n": CLIP + B2N + ["coop/recipe"],
    "coop-b2n-imagenet": CLIP + ["configs/data/imagenet.yaml", "protocols/base2new", "coop/recipe", "coop/ep50"],
    "coop-xd": CLIP + XD + ["coop/recipe", "coop/ep50"],
    "ivlp-b2n": CLIP + B2N + ["ivlp/recipe"],
    "ivlp-xd": CLIP + XD + ["ivlp/recipe"],
    "maple-b2n": CLIP + B2N + ["maple/recipe"],
    "maple-xd": CLIP + XD + ["maple/recipe", "maple/cross_dataset"],
    "dpl-b2n": CLIP + B2N + ["dpl/recipe"],
    "dpl-xd": CLIP + XD + ["dpl/recipe", "dpl/cross_dataset"],
    "dapt-b2n": CLIP + B2N + ["dapt/recipe"],
    "dapt-b2n-cls-attention": CLIP + B2N + ["dapt/recipe", "dapt/cls_attention"],
    "dapt-xd": CLIP + XD + ["dapt/recipe", "dapt/cross_dataset"],
    "dapt-few-shot": CLIP + FEW + ["dapt/recipe", "dapt/few_shot"],
    "disa-b2n": CLIP + B2N + ["disa/recipe"],
    "disa-xd": CLIP + XD + ["disa/recipe", "disa/cross_dataset"],
    "disa-few-shot": CLIP + FEW + ["disa/recipe", "disa/few_shot"],
    "ktpp": ["configs/trainer/default.yaml", "configs/data/mini_imagenet.yaml", "ktpp/recipe"],
    "ktpp-mnist": ["ktpp/mnist_5w1s"],
    "tcpa-hta-cifar10": VIT + ["configs/data/hta_cifar10.yaml", "tcpa/recipe"],
    "tcpa-vtab-dtd": VIT + ["configs/data/vtab_dtd.yaml", "tcpa/recipe"],
    "tcpa-fgvc-cars": VIT + ["configs/data/fgvc_cars.yaml", "tcpa/recipe"],
    **{
        f"tcpa-{data}": VIT + [f"configs/data/{data}.yaml", "tcpa/recipe", f"tcpa/{fragment}"]
        for data, fragment in [
            ("hta_cifar100", "cifar100"), ("hta_dtd", "dtd"), ("hta_flowers", "flowers"), ("fgvc_flowers", "flowers"),
            ("hta_gtsrb", "gtsrb"), ("hta_svhn", "svhn"), ("hta_nabirds", "nabirds"), ("nabirds", "nabirds"),
            ("hta_stanford_dogs", "stanford_dogs"), ("stanford_dogs", "stanford_dogs"), ("hta_cub", "cub"), ("cub", "cub"),
        ]
    },
    "vpt-deep": VIT + ["configs/data/hta_cifar10.yaml", "configs/prompt/vpt_deep.yaml"],
    "vpt-shallow": VIT + ["configs/data/hta_cifar10.yaml", "configs/prompt/vpt_shallow.yaml"],
}
#: The released TCPA schedule (train/utils.py cosine_lr per iteration, W = steps // 5) and pull.
TCPA_SCHEDULE = dict(name="adamw", schedule="cosine", warmup="linear", warmup_fraction=0.2, warmup_epochs=0.0,
                     cosine_over="remaining", interval="step")  # fmt: skip


def stack_paths(stack: list[str]) -> list[Path]:
    return [ROOT / f if f.startswith("configs/") else EXPERIMENTS / f"{f}.yaml" for f in stack]


def composition(path: Path) -> list[Path]:
    cfg = yaml.safe_load(path.read_text()) or {}
    files = []
    if "class_path" not in (cfg.get("model") or {}):
        files.append(DEFAULT_MODEL)
    if "class_path" not in (cfg.get("data") or {}):
        files.append(DEFAULT_DATA)
    return [f for f in files if f != path] + [path]


def check_learner_composes(name: str, folder: Path) -> None:
    """A fragment ``prompt_learner: {class_path: <name>}`` composes with the default backbone and
    data fragments through the CLI parser and resolves to the registered class, with its defaults."""
    fragment = folder / f"{name}.yaml"
    fragment.write_text(yaml.safe_dump({"model": {"init_args": {"prompt_learner": {"class_path": name}}}}))
    cfg = parse_configs([str(DEFAULT_MODEL), str(DEFAULT_DATA), str(fragment)])
    learner = cfg.model.init_args.prompt_learner
    assert learner.class_path == import_path(prompts.PROMPTS.get(name)), "the short name is the registered class"
    assert learner.init_args is not None


@pytest.mark.parametrize("name", prompts.available())
def test_every_registered_learner_composes_by_its_short_name(name: str, tmp_path: Path):
    check_learner_composes(name, tmp_path)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses(path: Path):
    cfg = parse_configs([str(p) for p in composition(path)])
    assert cfg.model.class_path and cfg.data.class_path


_PARSED: dict[str, object] = {}


def composed(name: str):
    if name not in _PARSED:
        _PARSED[name] = parse_configs([str(p) for p in stack_paths(STACKS[name])])
    return _PARSED[name]


@pytest.mark.parametrize("name", list(STACKS))
def test_documented_stack_parses(name: str):
    cfg = composed(name)
    assert cfg.model.class_path and cfg.data.class_path and cfg.model.init_args.optim is not None


def test_every_experiment_file_is_in_a_documented_stack():
    used = {p for stack in STACKS.values() for p in stack_paths(stack)}
    files = set(EXPERIMENTS.rglob("*.yaml"))
    assert files and files <= used, f"not in any documented stack: {sorted(str(f) for f in files - used)}"
    assert all(p.exists() for p in used)


def schedule_table() -> list[dict[str, str]]:
    """Rows of the "official vs ours" table in configs/experiments/README.md."""
    text = (EXPERIMENTS / "README.md").read_text()
    section = text.split("## Learning-rate schedules: official vs ours", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_schedule_table_matches_the_composed_recipes():
    rows = schedule_table()
    methods = {r["method"].split(" ")[0] for r in rows}
    assert {"CoOp", "IVLP", "MaPLe", "DAPT", "DPL", "DiSa", "KTPP", "TCPA", "VPT"} <= methods
    for row in rows:
        ours = yaml.safe_load("{" + row["ours"].strip("`") + "}")
        recipes = re.findall(r"`([^`]+\.yaml)`", row["recipe"])
        assert recipes, row
        for recipe in recipes:
            key = recipe.removesuffix(".yaml") if not recipe.startswith("configs/") else recipe
            stacks = [n for n, s in STACKS.items() if key in s]
            assert stacks, f"{recipe} is in no documented stack"
            for name in stacks:
                optim = composed(name).model.init_args.optim
                for option, value in ours.items():
                    assert optim[option] == value, f"{name}: optim.{option} is {optim[option]!r}, the README says {value!r}"


@pytest.mark.parametrize("name", [n for n in STACKS if n.startswith("tcpa-")])
def test_every_tcpa_recipe_uses_the_released_schedule_and_pull(name: str):
    init = composed(name).model.init_args
    for option, value in TCPA_SCHEDULE.items():
        assert init.optim[option] == value, (name, option)
    learner = init.prompt_learner.init_args
    assert learner.pull_weight == 0.01 and learner.pull_detach_tokens is False and learner.role_only is False


def test_typo_in_a_key_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    prompt_learner:\n      class_path: coop\n      init_args:\n        n_ctxx: 4\n")
    with pytest.raises(SystemExit):
        parse_configs([str(DEFAULT_MODEL), str(DEFAULT_DATA), str(bad)])
