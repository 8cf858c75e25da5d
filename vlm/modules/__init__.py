"""LightningModules: each composes one backbone, at most one prompt learner and one pruner.

The classes are imported on first use (``vlm.modules.CLIPClassifier``), so that a config that names
one model does not import the others' libraries (open_clip, timm, transformers); :func:`import_all`
imports every one (``vlm fit --help`` lists them as the known ``--model`` classes)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> the module that defines it.
_LAZY = {
    "CheckpointMismatchError": "vlm.modules.base",
    "LearnedOnlyModule": "vlm.modules.base",
    "CLIPClassifier": "vlm.modules.clip_classifier",
    "EpisodicClassifier": "vlm.modules.episodic",
    "OptimConfig": "vlm.modules.optim",
    "ViTClassifier": "vlm.modules.vit_classifier",
}
__all__ = ["CLIPClassifier", "CheckpointMismatchError", "EpisodicClassifier", "LearnedOnlyModule", "OptimConfig", "ViTClassifier"]

if TYPE_CHECKING:
    from vlm.modules.base import CheckpointMismatchError, LearnedOnlyModule
    from vlm.modules.clip_classifier import CLIPClassifier
    from vlm.modules.episodic import EpisodicClassifier
    from vlm.modules.optim import OptimConfig
    from vlm.modules.vit_classifier import ViTClassifier


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def import_all() -> None:
    """Import every module of the package (and so every LightningModule subclass vlm defines)."""
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
