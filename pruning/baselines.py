"""Baseline pruners: single-layer CLS attention (FasterVLM) and random selection.

* ``cls_attention`` (FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token
  Pruning"): S_j = (1/H) sum_h A^l_{h, CLS, j} at one layer l (default: the last block of the pass,
  i.e. LLaVA's feature layer); keep the top ``num_tokens`` in raster order. It is VTC-CLS with a
  one-layer window.
* ``random``: ``num_tokens`` patches drawn uniformly per sample (a fixed seed per forward pass, so
  runs repeat), kept in raster order.

Both cut after ``layer`` and keep CLS and every other non-patch token.
"""

from __future__ import annotations

import torch

from vlm.kernels import AttnOutput, AttnSpec
from vlm.pruning.base import TokenPruner
from vlm.pruning.registry import register
from vlm.tokens import TokenState


@register("cls_attention")
class CLSAttention(TokenPruner):
    """Top-k of the head-mean CLS attention at one layer.

    Args:
        num_tokens: patch tokens kept per image.
        layer: the block whose CLS attention scores the patches and after which they are cut.
    """

    def __init__(self, num_tokens: int = 64, layer: int = -1) -> None:
        super().__init__(num_tokens)
        self.layer = layer

    def attention_spec(self, tower: str, layer: int, state: TokenState, spec: AttnSpec) -> AttnSpec:
        return self.request_cls_probe(state, spec) if layer == self.resolve_layer(self.layer, state) else spec

    def after_block(self, tower: str, layer: int, state: TokenState, attn: AttnOutput) -> TokenState:
        if layer != self.resolve_layer(self.layer, state):
            return state
        state, _ = self.keep_top(state, self.cls_attention(state, attn), self.num_tokens)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``, the same count for every sample."""
        return [self.layer if self.layer >= 0 else num_blocks + self.layer], False


@register("random")
class RandomPruner(TokenPruner):
    """Uniformly random patches.

    Args:
        num_tokens: patch tokens kept per image.
        layer: the block after which tokens are cut.
        seed: seed of the generator drawn from in every forward pass.
    """

    def __init__(self, num_tokens: int = 64, layer: int = -1, seed: int = 0) -> None:
        super().__init__(num_tokens)
        self.layer = layer
        self.seed = seed

    def after_block(self, tower: str, layer: int, state: TokenState, attn: AttnOutput) -> TokenState:
        if layer != self.resolve_layer(self.layer, state):
            return state
        gen = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(state.x.shape[:2], generator=gen).to(state.x.device)
        state, _ = self.keep_top(state, scores, self.num_tokens)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}, seed={self.seed}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``, the same count for every sample."""
        return [self.layer if self.layer >= 0 else num_blocks + self.layer], False
