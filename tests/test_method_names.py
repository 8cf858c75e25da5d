"""Shared code does not name methods (issue 13): only a method's own files and the registries'
import lists may name a prompt learner or a pruner, so that adding or changing a method needs no
edit elsewhere. The methods are read from the registries (short names and class names), not listed
here; a name counts as a whole word, in any case, in code, docstrings and comments alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vlm.prompts.registry import PROMPTS
from vlm.pruning.registry import PRUNERS

ROOT = Path(__file__).resolve().parents[1]
#: The code folders scanned (tests, configs, docs, benchmarks and scripts may name methods).
FOLDERS = ("vlm", "prompts", "pruning", "kernels", "datamodules")
#: The registries' import lists: importing the method modules is how they register.
REGISTRY_LISTS = ("prompts/__init__.py", "pruning/__init__.py")
#: Short names that are also ordinary words of shared code, with why they cannot count:
EXCLUDED_NAMES = {
    # an English word ("random split", "random init", "a random draw"), everywhere
    "random": None,
    # the generic helper that reads a CLS attention row (TokenPruner.cls_attention), and the value
    # of learners' settings that take masks/saliency from the CLS attention (mask_source=...)
    "cls_attention": None,
    # the CoOp benchmark: its split files, folder layout and few-shot protocol, which the data
    # modules reproduce and name in their settings (family="coop", source="coop")
    "coop": ("datamodules",),
    # VPT's FGVC split files, a data format the FGVC readers read
    "vpt": ("datamodules",),
}


def methods() -> dict[str, tuple[str, Path]]:
    """short name -> (class name, the file that defines the class), from both registries."""
    out = {}
    for registry in (PROMPTS, PRUNERS):
        for name in registry.available():
            cls = registry.get(name)
            module = cls.__module__.split(".")[1:]  # vlm.prompts.coop -> prompts/coop.py
            out[name] = (cls.__name__, Path(*module).with_suffix(".py"))
    return out


def own_files() -> set[Path]:
    """Every method's own files: the file defining it and ``<folder>/<name>_*.py`` next to it.
    A method's files may name the methods they build on and cite (DAPT subclasses MaPLe, TCPA's
    ``base="vpt"``): method knowledge belongs there."""
    files: set[Path] = set()
    for name, (_, path) in methods().items():
        files.add(path)
        files.update(p.relative_to(ROOT) for p in (ROOT / path.parent).glob(f"{name}_*.py"))
    return files


def scanned_files() -> list[Path]:
    skip = own_files() | {Path(p) for p in REGISTRY_LISTS}
    files = []
    for folder in FOLDERS:
        files += [p.relative_to(ROOT) for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if p not in skip]


def test_methods_come_from_the_registries():
    found = methods()
    assert {"coop", "tcpa", "flowcut", "vtc_cls"} <= set(found), sorted(found)
    for name, (_, path) in found.items():
        assert (ROOT / path).is_file(), (name, path)


@pytest.mark.parametrize("path", scanned_files(), ids=str)
def test_shared_code_names_no_method(path: Path):
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    offenders = []
    for name, (cls_name, _) in methods().items():
        allowed_in = EXCLUDED_NAMES.get(name, ())
        counts = name not in EXCLUDED_NAMES or (allowed_in is not None and path.parts[0] not in allowed_in)
        words = {w for w in (name, cls_name) if counts or w.lower() != name}  # CoOp is coop
        if not words:
            continue
        pattern = re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(map(re.escape, sorted(words))) + r")(?![A-Za-z0-9_])", re.IGNORECASE)
        offenders += [f"{path}:{i}: {name}: {line.strip()}" for i, line in enumerate(lines, 1) if pattern.search(line)]
    assert not offenders, "shared code names a method (move the knowledge into the method's file):\n" + "\n".join(offenders)
