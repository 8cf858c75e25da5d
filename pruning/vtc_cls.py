"""VTC-CLS: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"
(Wang, Sun, Chen, Lin, Han, Ding, arXiv 2412.05819).

Score of patch j (the paper's multi-layer ensemble of CLS attention):

    s^l_j = (1/H) sum_h A^l_{h, CLS, j}                   (CLS query row, mean over heads)
    S_j   = sum_{l = start_layer}^{prune_layer} s^l_j     (plain sum over layers)

Keep the top ``num_tokens`` patches by S, in raster order; CLS is kept. For LLaVA the defaults cut
after the feature layer (the last block this pass runs, ``prune_layer=-1``) and sum the last seven
blocks (``start_layer=-7``: layers 16..22 of LLaVA-1.5's CLIP, the official default ``--layer 16``).
On a classifier, an earlier ``prune_layer`` makes the blocks above it run on fewer tokens.

Unlike the official code this runs at any batch size (scores are per sample, the official one
averages over the batch for B > 1) and reads the CLS row through ``AttnSpec.probe_rows`` instead
of materialising every layer's attention with eager CLIP attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from vlm.context import BlockContext, resolve_layer
from vlm.kernels import AttnOutput, AttnSpec
from vlm.pruning.base import TokenPruner
from vlm.pruning.registry import register
from vlm.tokens import TokenState


@register("vtc_cls")
class VTCCLS(TokenPruner):
    """Multi-layer CLS-attention ensemble.

    Args:
        num_tokens: patch tokens kept per image (U in the paper).
        start_layer: first block whose CLS attention is summed (negative: from the end of the pass).
        prune_layer: the block after which tokens are cut (default: the last block of the pass).
    """

    def __init__(self, num_tokens: int = 64, start_layer: int = -7, prune_layer: int = -1) -> None:
        super().__init__(num_tokens)
        self.start_layer = start_layer
        self.prune_layer = prune_layer

    @dataclass
    class PassState:
        """``score``: the running sum S ``[B, N]`` over the window's blocks so far."""

        score: Optional[Tensor] = None

    def _window(self, ctx: BlockContext) -> tuple[int, int]:
        """(first summed block, cut block); a start before block 0 is clamped to 0."""
        prune = ctx.resolve_layer(self.prune_layer)
        start = self.start_layer if self.start_layer >= 0 else max(ctx.num_layers + self.start_layer, 0)
        return min(start, prune), prune

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        start, prune = self._window(ctx)
        return self.request_cls_probe(ctx, state, spec) if start <= ctx.layer <= prune else spec

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        start, prune = self._window(ctx)
        if not start <= ctx.layer <= prune:
            return state
        st = ctx.state(self)
        s = self.cls_attention(ctx, attn)
        st.score = s if ctx.layer == start else st.score + s
        if ctx.layer < prune:
            return state
        state, _ = self.keep_top(state, st.score, self.num_tokens, group=ctx.token_group)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, start_layer={self.start_layer}, prune_layer={self.prune_layer}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``prune_layer``, ``num_tokens`` patches for every sample."""
        return [resolve_layer(self.prune_layer, num_blocks)], False
