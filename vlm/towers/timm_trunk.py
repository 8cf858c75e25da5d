"""The block-loop runner for a timm vision trunk, chosen by its class.

``VisionTransformer`` (ViT, DeiT, DINOv2, SigLIP, CLIP towers in timm) runs through
:class:`~vlm.towers.vit.TimmViTRunner`; ``Eva`` (EVA02, DINOv3, RoPE ViTs, PE) through
:class:`~vlm.towers.eva.EvaRunner`. Both have the same interface and parity contract (their
modules' docstrings).
"""

from __future__ import annotations

from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vlm.towers.eva import EvaRunner
from vlm.towers.vit import TimmTrunkRunner, TimmViTRunner

#: timm model classes the runners take, and the runner of each.
RUNNERS: dict[type, type[TimmTrunkRunner]] = {VisionTransformer: TimmViTRunner, Eva: EvaRunner}


def timm_runner_for(model: nn.Module) -> TimmTrunkRunner:
    """The block-loop runner of a timm vision ``model`` (a ``TypeError`` naming the supported
    classes for any other)."""
    for cls, runner in RUNNERS.items():
        if isinstance(model, cls):
            return runner(model)
    names = ", ".join(f"timm.models.{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c in RUNNERS)
    raise TypeError(
        f"{type(model).__name__} is not a timm model the block-loop runner supports ({names}); "
        "use a ViT-family (vit_*, deit_*, *_dinov2, *_siglip_*) or Eva-family (eva02_*, *_dinov3, *_rope_*) model."
    )
