"""What every backbone wrapper shares: freezing, identity and a weight checksum."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


class Backbone(nn.Module):
    """A library model owned by ``self.model`` plus block-loop runners over it.

    ``freeze=True`` (prompt learning, pruning) sets ``requires_grad=False`` on every weight and keeps
    the model in eval mode even while the LightningModule trains (dropout off, as the released
    prompt-learning code does). ``identity()`` names the backbone for checkpoints and exports; ``checksum()``
    hashes its weights so a checkpoint can refuse a different backbone.
    """

    family: str = "backbone"

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
