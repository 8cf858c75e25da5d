"""open_clip's timm-backed image towers (``TimmModel``: SigLIP, SigLIP2, EVA02-CLIP) run block by block.

open_clip's ``TimmModel`` is a timm ``trunk`` (a ``VisionTransformer`` or an ``Eva``) and a
``head`` (an empty ``nn.Sequential``, or a projection): ``visual(x) = head(trunk(x))``, where the
trunk's own head does the pooling (``timm_pool``: ``map`` for SigLIP, ``token`` for EVA02-CLIP) and,
when open_clip asked for no extra projection, the projection to the joint width (the trunk's
``head`` linear). The trunk runs through the timm runner of its class
(:func:`~vlm.towers.timm_trunk.timm_runner_for`), so hooks see the same blocks as on a timm
backbone.

Parity contract: with no hooks, the runner's ``pooled`` equals open_clip's ``model.encode_image``
(tests check 1e-5, fp32). ``TowerOutput.state`` is the trunk's token state after its final norm.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.tokens import TokenState
from vlm.towers.runner import TowerOutput
from vlm.towers.timm_trunk import timm_runner_for


class OpenClipTimmVisionRunner:
    """The trunk's runner (patch embedding, blocks, final norm, pooling and the trunk's head), then
    open_clip's ``head``. Same interface as :class:`~vlm.towers.clip.ClipVisionRunner`."""

    tower = Tower.VISION

    def __init__(self, visual: nn.Module) -> None:
        if any(name == "pool" for name, _ in visual.head.named_children()):
            raise TypeError(
                "open_clip TimmModel with timm_pool 'abs_attn'/'rot_attn' (a pooling layer in its head) is not supported "
                "by the runner; use timm_pool 'map', 'token' or 'avg'."
            )
        self.visual = visual
        self.trunk = timm_runner_for(visual.trunk)
        self.blocks = self.trunk.blocks
        self.width = self.trunk.width
        self.num_layers = self.trunk.num_layers
        self.heads = self.trunk.heads
        self.num_prefix_tokens = self.trunk.num_prefix_tokens

    @property
    def patches_per_image(self) -> Optional[int]:
        """Patch tokens per image of the trunk (``patch_embed.num_patches``), None if unknown."""
        count = getattr(getattr(self.visual.trunk, "patch_embed", None), "num_patches", None)
        return int(count) if count is not None else None

    @property
    def output_dim(self) -> int:
        """Width of the pooled feature: open_clip's projection, else the trunk's head, else its width."""
        for layer in reversed(list(self.visual.head.modules())):
            if isinstance(layer, nn.Linear):
                return int(layer.out_features)
        head = getattr(self.visual.trunk, "head", None)
        if isinstance(head, nn.Linear):
            return int(head.out_features)
        return int(self.visual.trunk.num_features)

    def embed(self, images: Tensor) -> TokenState:
        return self.trunk.embed(images)

    def pool(self, state: TokenState) -> Tensor:
        """The embedding of the final tokens (after the trunk's final norm): the trunk's pooling and
        head, then open_clip's head."""
        return self.visual.head(self.trunk.forward_head(state))

    @property
    def dense_features(self) -> Optional[Callable[[Tensor], Tensor]]:
        """Per-token features in the joint space (the trunk's ``fc_norm`` and head, then open_clip's
        head, as the pooled token gets them) for a token-pooled trunk (EVA02-CLIP); None for an
        attention-pooled one (SigLIP), whose pooled feature is no per-token map."""
        model = self.trunk.model
        if getattr(model, "attn_pool", None) is not None:
            return None
        return lambda tokens: self.visual.head(model.head(model.fc_norm(tokens)))

    def __call__(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        state = self.trunk.forward_features(images, hooks)
        return TowerOutput(self.pool(state), state)
