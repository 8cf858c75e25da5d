"""The import graph of the installed namespace has no cycle, and methods never import towers.

The graph is built from the source with pyproject's ``package-dir`` mapping (``vlm.pruning`` lives
in ``pruning/``, ...). Every ``import`` counts, at module level or inside a function: a lazy import
hides a cycle from Python, not from the design. ``from pkg import name`` is an edge to the module
``pkg.name`` when that is a module, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {pkg: REPO / folder for pkg, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the installed namespace (subpackages included)."""
    dirs = package_dirs()
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "vlm" and parts and f"vlm.{parts[0]}" in dirs:
                continue  # a folder of vlm/ that another mapping owns (none today; guard anyway)
            out[name] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods]
                if len(targets) < len(subs):
                    targets.append(node.module)
            else:
                continue
            for t in targets:
                target = owner(t) if t.startswith("vlm") else None
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(modules())


def test_the_graph_sees_the_mapped_packages(graph: dict[str, set[str]]) -> None:
    assert {"vlm.kernels.dispatch", "vlm.pruning.flowcut", "vlm.prompts.tcpa", "vlm.towers.runner"} <= set(graph)
    assert "vlm.llm_stage" in graph["vlm.pruning.llm"]  # an edge the checks below rely on


def test_no_import_cycle_between_files_or_packages(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_do_not_import_towers_or_modules(graph: dict[str, set[str]]) -> None:
    """Learners and pruners speak the hook protocol (vlm.hooks, vlm.tokens, vlm.kernels) only."""
    for name, deps in graph.items():
        if name.startswith(("vlm.prompts", "vlm.pruning")):
            bad = sorted(d for d in deps if d.startswith(("vlm.towers", "vlm.modules", "vlm.runtime.cli", "vlm.backbones")))
            assert not bad, f"{name} imports {bad}"
