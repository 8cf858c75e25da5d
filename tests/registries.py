"""What the generic suites iterate over, read from the registries, never listed by hand.

A method is one file that calls ``@register("name")`` (README "Extending"); the generic tests
take their lists from here, so a new method joins every suite that applies to it without an edit
to any test (tests/test_one_file_method.py checks this with a throwaway pruner and learner).
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType

from vlm.context import Tower


def registered_in_files(package: ModuleType) -> list[str]:
    """The names the package's own files register (``@register("name")`` / ``@X.register("name")``
    on a class), read from the source: what ``available()`` must equal once the package is imported.
    A method file whose import the package forgot, or a registered name no file declares, differs."""
    names: set[str] = set()
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for deco in node.decorator_list:
                func = deco.func if isinstance(deco, ast.Call) else None
                called = getattr(func, "id", None) or getattr(func, "attr", None)
                if called == "register" and deco.args and isinstance(deco.args[0], ast.Constant):
                    names.add(str(deco.args[0].value))
    return sorted(names)


def text_learners() -> list[str]:
    """Registered prompt learners that act on the text tower (built with their defaults)."""
    from vlm import prompts

    return [n for n in prompts.available() if Tower.TEXT in prompts.create(n).towers]


def merge_unit_pruners() -> list[str]:
    """Registered vision pruners that run on merge-unit towers (Qwen's; ``runs_on_merge_units``)."""
    from vlm import pruning

    return [n for n in vision_pruners() if pruning.create(n).runs_on_merge_units]


def vision_pruners() -> list[str]:
    """Registered pruners that cut in the vision tower (LLM-stage pruners act on ``Tower.LLM``)."""
    from vlm import pruning

    return [n for n in pruning.available() if Tower.VISION in pruning.create(n).towers]


def llm_pruners() -> list[str]:
    """Registered pruners that cut inside the language model (``Tower.LLM``)."""
    from vlm import pruning

    return [n for n in pruning.available() if Tower.LLM in pruning.create(n).towers]
