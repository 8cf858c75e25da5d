"""`vlm.prompts`: prompt learners (TowerHooks with learnable prompts) and their registry.

``available()`` lists the short names; ``create(name, **kwargs)`` builds one. Configs may use a
short name (``class_path: coop``) or a full class path.
"""

from typing import Any

from vlm.prompts.base import PromptLearner, TextInputs
from vlm.prompts.registry import PROMPTS, register

from vlm.registry import import_modules

import_modules(__name__, __path__)  # every method file registers itself: adding one is one file


def available() -> list[str]:
    return PROMPTS.available()


def create(name: str, **kwargs: Any) -> PromptLearner:
    return PROMPTS.create(name, **kwargs)


__all__ = ["PromptLearner", "TextInputs", "available", "create", "register"]
