"""LightningModules: each composes one backbone, at most one prompt learner and one pruner."""

from vlm.modules.base import CheckpointMismatchError, LearnedOnlyModule
from vlm.modules.clip_classifier import CLIPClassifier
from vlm.modules.episodic import EpisodicClassifier
from vlm.modules.optim import OptimConfig
from vlm.modules.vit_classifier import ViTClassifier

__all__ = [
    "CheckpointMismatchError",
    "CLIPClassifier",
    "EpisodicClassifier",
    "LearnedOnlyModule",
    "OptimConfig",
    "ViTClassifier",
]
