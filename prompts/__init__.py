"""`vlm.prompts`: prompt learners (TowerHooks with learnable prompts) and their registry.

``available()`` lists the short names; ``create(name, **kwargs)`` builds one. Configs may use a
short name (``class_path: coop``) or a full class path.
"""

from typing import Any

from vlm.prompts.base import PromptLearner, TextInputs
from vlm.prompts.registry import PROMPTS, register

# Importing the method modules registers them.
from vlm.prompts import coop, vpt, vfpt, tcpa, ivlp, maple, dpl, ktpp, dapt, disa  # noqa: E402,F401  isort: skip


def available() -> list[str]:
    return PROMPTS.available()


def create(name: str, **kwargs: Any) -> PromptLearner:
    return PROMPTS.create(name, **kwargs)


__all__ = ["PromptLearner", "TextInputs", "available", "create", "register"]
