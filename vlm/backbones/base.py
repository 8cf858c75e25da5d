"""What every backbone wrapper shares: freezing, identity, a weight checksum and the token-budget check."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.runtime.reliability import check_token_budget


class Backbone(nn.Module):
    """A library model owned by ``self.model`` plus block-loop runners over it.

    ``freeze=True`` (prompt learning, pruning) sets ``requires_grad=False`` on every weight and keeps
    the model in eval mode even while the LightningModule trains (dropout off, as the released
    prompt-learning code does). ``identity()`` names the backbone for checkpoints and exports; ``checksum()``
    hashes its weights so a checkpoint can refuse a different backbone. ``patches_per_image`` (with
    ``patch_unit`` and ``views_per_image``) says how many patch tokens a pruner sees, and
    :meth:`check_budget` refuses a pruner whose budget does not fit when a model is built.
    """

    family: str = "backbone"
    #: what one vision-tower row is, and so what ``patches_per_image`` and a pruner's ``num_tokens``
    #: count per: ``"image"``, or ``"crop"`` for an anyres backbone that prunes each crop separately.
    patch_unit: str = "image"

    def __init__(self, freeze: bool = True) -> None:
        super().__init__()
        self.freeze = freeze
        self._checksum: str | None = None

    def _apply_freeze(self) -> None:
        if self.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    @property
    def patches_per_image(self) -> Optional[int]:
        """Patch tokens a vision pruner sees per image (per crop when ``patch_unit`` is ``"crop"``),
        at the layer the tower's output is read from; None if unknown (then no budget is checked).
        A backbone whose images differ in size (dynamic resolution) gives the most one image can have."""
        return None

    @property
    def views_per_image(self) -> int:
        """The most vision-tower rows (``patch_unit``s) one image becomes: 1, or an anyres backbone's
        base view plus its largest crop grid."""
        return 1

    @property
    def budget_note(self) -> str:
        """How the budget error names this backbone and where its patch count comes from."""
        return type(self).__name__

    def check_budget(self, pruner: Any) -> None:
        """Raise ``TokenBudgetError`` if ``pruner`` keeps more tokens than this backbone gives it.

        Called once when a model is built (the classifiers through ``check_hooks``, ``LlavaEval``);
        the rule is :func:`vlm.runtime.reliability.check_token_budget`, the same for every backbone,
        which only declares its counts above."""
        check_token_budget(pruner, self.patches_per_image, unit=self.patch_unit, views=self.views_per_image,
                           backbone=self.budget_note)

    def identity(self) -> dict[str, Any]:  # pragma: no cover - overridden
        return {"family": self.family}

    def checksum(self) -> str:
        """sha256 over the model's state dict (names, shapes, dtypes and bytes), cached if frozen."""
        if self._checksum is not None and self.freeze:
            return self._checksum
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._checksum = h.hexdigest()
        return self._checksum


class TwoTowerBackbone(Backbone):
    """A CLIP-like backbone (:class:`~vlm.protocols.ImageTextBackbone`): the encoders and the vision
    pass over its ``vision`` and ``text`` runners, shared by the open_clip and transformers wrappers."""

    vision: Any
    text: Any

    def encode_image(self, images: Tensor, hooks: Optional[Iterable[Any]] = None, normalize: bool = False) -> Tensor:
        out = self.vision(images, hooks).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self,
        tokens: Tensor,
        hooks: Optional[Iterable[Any]] = None,
        embeds: Optional[Tensor] = None,
        normalize: bool = False,
    ) -> Tensor:
        out = self.text(tokens, hooks, embeds).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def run_vision(self, images: Tensor, hooks: Optional[Iterable[Any]] = None) -> Any:
        """The vision runner's ``TowerOutput`` (pooled feature and final token state)."""
        return self.vision(images, hooks)
