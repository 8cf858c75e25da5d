"""`vlm.pruning`: visual-token pruners (TowerHooks) and their registry.

``available()`` lists the short names: the vision-tower pruners ``vtc_cls``, ``flowcut``,
``cls_attention``, ``random``, and the LLM-stage ``flowcut_llm`` (an :class:`LlmTokenPruner`);
``create(name, **kwargs)`` builds one, and ``create("none")`` returns None (no pruning), so a config
can switch pruning off by name. Configs may also use ``class_path: <name>`` or a full class path.
"""

from typing import Any, Optional

from vlm.pruning.base import Pruner, TokenPruner
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import PRUNERS, register

from vlm.registry import import_modules

import_modules(__name__, __path__)  # every method file registers itself: adding one is one file

#: The name that means "no pruner".
NONE = "none"


def available() -> list[str]:
    return PRUNERS.available()


def create(name: str, **kwargs: Any) -> Optional[Pruner]:
    if name.lower() == NONE:
        if kwargs:
            raise ValueError(f"pruner 'none' takes no arguments, got {sorted(kwargs)}.")
        return None
    return PRUNERS.create(name, **kwargs)


__all__ = ["LlmProbe", "LlmTokenPruner", "Pruner", "TokenPruner", "available", "create", "register"]
