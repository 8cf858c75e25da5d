"""Every YAML under configs/ parses and validates against the code (class paths, keys, types).

Fragments compose like the README says: a file without a model ``class_path`` is parsed after the
default backbone fragment, one without a data ``class_path`` after the default data fragment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm.cli import parse_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
DEFAULT_MODEL = ROOT / "configs/backbone/clip_vit_b16.yaml"
DEFAULT_DATA = ROOT / "configs/data/oxford_pets.yaml"


def composition(path: Path) -> list[Path]:
    cfg = yaml.safe_load(path.read_text()) or {}
    files = []
    if "class_path" not in (cfg.get("model") or {}):
        files.append(DEFAULT_MODEL)
    if "class_path" not in (cfg.get("data") or {}):
        files.append(DEFAULT_DATA)
    return [f for f in files if f != path] + [path]


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses(path: Path):
    cfg = parse_configs([str(p) for p in composition(path)])
    assert cfg.model.class_path and cfg.data.class_path


def test_typo_in_a_key_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    prompt_learner:\n      class_path: coop\n      init_args:\n        n_ctxx: 4\n")
    with pytest.raises(SystemExit):
        parse_configs([str(DEFAULT_MODEL), str(DEFAULT_DATA), str(bad)])
