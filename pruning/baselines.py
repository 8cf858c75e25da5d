"""Baseline pruners: single-layer CLS attention (FasterVLM) and random selection.

* ``cls_attention`` (FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token
  Pruning"): S_j = (1/H) sum_h A^l_{h, CLS, j} at one layer l (default: the last block of the pass,
  i.e. LLaVA's feature layer); keep the top ``num_tokens`` in raster order. It is VTC-CLS with a
  one-layer window.
* ``random``: ``num_tokens`` patches drawn uniformly per sample (a fixed seed per forward pass, so
  runs repeat; one draw per original token position, so a sample's draw never depends on its
  batch neighbours), kept in raster order.

Both cut after ``layer`` and keep CLS and every other non-patch token.
"""

from __future__ import annotations

import torch

from vlm.context import BlockContext, resolve_layer
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

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        return self.request_cls_probe(ctx, state, spec) if ctx.layer == ctx.resolve_layer(self.layer) else spec

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        state, _ = self.keep_top(state, self.cls_attention(ctx, attn), self.num_tokens, group=ctx.token_group)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``, the same count for every sample."""
        return [resolve_layer(self.layer, num_blocks)], False


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

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        # one draw per original token position, so a sample's draw depends on its own tokens only
        # (not on its batch neighbours or the padded width)
        pos = state.positions.clamp(min=0)
        gen = torch.Generator().manual_seed(self.seed)
        draws = torch.rand(int(pos.max()) + 1, generator=gen).to(state.x.device)  # sync: a shape
        scores = draws[pos]
        state, _ = self.keep_top(state, scores, self.num_tokens, group=ctx.token_group)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}, seed={self.seed}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``, the same count for every sample."""
        return [resolve_layer(self.layer, num_blocks)], False
