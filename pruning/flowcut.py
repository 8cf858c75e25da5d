"""FlowCut: "Rethinking Redundancy via Information Flow for Efficient Vision-Language Models"
(Tong et al., NeurIPS 2025, arXiv 2505.19536), the vision-tower stage.

At every block l that runs before the final cut, with N current patches of one image:

    a_j   = (1/H) sum_h A_{h, CLS, j}                          relation: CLS-row attention
    m_j   = (1/H) sum_h softmax_k(v_{h,CLS} . v_{h,k})_j       semantic: CLS-value similarity
                                                               (no 1/sqrt(d); softmax over all
                                                               valid tokens, CLS included)
    n_j   = || (1/H) sum_h v_{h,j} ||_1                        information density: value L1 norm
    S^l_j = (a_j / sum_p a_p + m_j / sum_p m_p) * n_j          (sums over patches only)
    C^l   = ema * C^{l-1} + (1 - ema) * S^l,  C^{first} = S^{first}   cumulative flow score

Progressive, entropy-adaptive cut: with R blocks in the pass, rpl = R - 2 - l; a cut happens when
rpl is even (every second block), and at rpl = 0 (the block below the last one) the image is cut
to the target T, so the last block (LLaVA's feature layer) runs on T patches. At a cut with N > T
patches, let p be a renormalised over the patches and rho = H(p) / log N its normalised entropy:

    P = round((N - T) / sqrt(rpl) * (1 - rho^2))   (rpl > 0),    P = N - T   (rpl = 0)

keep max(N - P, T) patches with the largest C, in raster order; CLS is never pruned.

Prune count across views (``shared_count``). The official code takes P as the maximum over its
vision batch. For LLaVA-1.5 that batch is one image (its evaluation runs batch size 1); for
LLaVA-NeXT it is the image's base view and sub-crops, stacked on the batch axis, so every crop of
the image is cut with the largest of their counts and all keep the same number of patches. By
default we do the same per image: rows that the runner marks as views of one image
(``ctx.image_index``) share ``P = max`` over them, which reproduces the released anyres
selection. ``shared_count=False`` computes each crop's P from its own attention (a crop's kept set
then no longer depends on the other views of its image). Rows of different images never share a
count, in either mode: the official batch maximum over several images made a sample's tokens depend
on its neighbours; here the state becomes ragged instead, which the attention's ``k_lengths``
handles.

Other differences from the official code: any batch size works, and scores come from
``probe_rows`` and the block's values instead of eager attention in every layer.

Towers without a CLS token (Qwen2.5-VL, Qwen3-VL), following the released Qwen port
(``FlowCut_Qwen``): the CLS relay is replaced by the *global query*, the mean of the image's
queries (``AttnSpec.probe_mean_query``), and the vision-stage score has no semantic term:

    a_j = (1/H) sum_h softmax_k(q_bar_h . k_{h,k} / sqrt(d))_j,   q_bar_h = mean_i q_{h,i}
    S^l_j = a_j * n_j

with the same EMA and entropy-adaptive cuts, counted from the last block (rpl = R - 1 - l: the
port cuts to T after the last block, before the merger). T counts the tokens that reach the LLM:
one per 2x2 merge unit (``ctx.token_group``). The port keeps 4T single patches and lets the merger
concatenate any four kept ones; here a merge unit scores the mean of its patches and is kept or
dropped whole, so every LLM token is a real 2x2 neighbourhood.

The values come with the attention: FlowCut sets ``AttnSpec.return_values`` in the blocks it
scores, and reads ``AttnOutput.values`` (a reference to the block's ``v``, no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from vlm.kernels import AttnOutput, AttnSpec
from vlm.pruning.base import TokenPruner
from vlm.pruning.registry import register
from vlm.context import BlockContext
from vlm.tokens import TokenState, TokenType


def entropy_prune_count(attn: Tensor, patch: Tensor, target: int, rpl: int, group: int = 1) -> Tensor:
    """Patches (groups of ``group`` patches) to drop per sample at a cut, from the head-mean CLS
    attention ``attn [B, N]``; the entropy is over the patches."""
    n = patch.sum(1)
    excess = (n // group - target).clamp(min=0)
    if rpl == 0:
        return excess
    p = attn.float() * patch
    p = p / p.sum(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)
    rho = ent / n.float().clamp(min=2).log()
    drop = torch.round(excess.float() / math.sqrt(rpl) * (1 - rho**2)).long()
    return torch.where(excess > 0, drop, torch.zeros_like(drop))


def max_per_image(count: Tensor, image: Optional[Tensor]) -> Tensor:
    """``count [B]`` replaced by its maximum over the rows of the same image (``image [B]`` ids in
    ``0..B-1``; None: every row is its own image)."""
    if image is None:
        return count
    image = image.to(count.device)
    best = torch.zeros_like(count).scatter_reduce(0, image, count, "amax", include_self=False)
    return best[image]


@register("flowcut")
class FlowCut(TokenPruner):
    """Information-flow pruning inside the vision tower.

    Args:
        num_tokens: tokens kept per image (per crop for LLaVA-NeXT; merged tokens for Qwen) after
            the last cut (T).
        ema: weight of the previous cumulative score (0.5 in the paper's code).
        shared_count: the views of one image (LLaVA-NeXT's crops) are cut with one prune count, the
            maximum of theirs, as the released code does; False: each crop by its own count.
    """

    def __init__(self, num_tokens: int = 64, ema: float = 0.5, shared_count: bool = True) -> None:
        super().__init__(num_tokens)
        self.ema = float(ema)
        self.shared_count = bool(shared_count)

    @dataclass
    class PassState:
        """``cum``: the cumulative flow score C ``[B, N]`` of the current tokens (None before the
        first scored block)."""

        cum: Optional[Tensor] = None

    @staticmethod
    def _rpl(ctx: BlockContext, state: TokenState) -> int:
        """Blocks left before the final cut: the LLaVA port cuts one block before the pass ends,
        the port for towers without CLS after its last block."""
        return ctx.num_layers - (2 if ctx.has_cls(state.types) else 1) - ctx.layer

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        if self._rpl(ctx, state) < 0:
            return spec
        return self.request_cls_probe(ctx, state, spec).replace(return_values=True)

    def flow_score(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> tuple[Tensor, Tensor]:
        """(S^l ``[B, N]``, zero off patches; head-mean CLS (or global-query) attention ``[B, N]``)."""
        a = self.cls_attention(ctx, attn)
        v = self.key_columns(ctx, attn.values, dim=2).float()  # [B, H, N, d]
        valid = state.valid_mask()
        patch = state.type_mask(TokenType.PATCH)
        density = v.mean(1).abs().sum(-1)
        if not ctx.has_cls(state.types):  # the Qwen port's score: global-query relation x density
            return a * density * patch, a
        cls = v.index_select(2, self.cls_row(state))[:, :, 0]  # [B, H, d]
        sim = torch.einsum("bhd,bhnd->bhn", cls, v).masked_fill(~valid[:, None], float("-inf"))
        m = sim.softmax(-1).mean(1)
        a_p, m_p = a * patch, m * patch
        tiny = torch.finfo(torch.float32).tiny
        rel = a_p / a_p.sum(1, keepdim=True).clamp_min(tiny)
        sem = m_p / m_p.sum(1, keepdim=True).clamp_min(tiny)
        return (rel + sem) * density * patch, a

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        rpl = self._rpl(ctx, state)
        if rpl < 0:
            return state
        st = ctx.state(self)
        score, a = self.flow_score(ctx, state, attn)
        cum = score if st.cum is None else self.ema * st.cum + (1 - self.ema) * score
        if rpl % 2 == 0:
            g = ctx.token_group
            patch = state.type_mask(TokenType.PATCH)
            drop = entropy_prune_count(a, patch, self.num_tokens, rpl, g)
            if self.shared_count:
                drop = max_per_image(drop, ctx.image_index)
            count = torch.maximum(patch.sum(1) // g - drop, torch.full_like(drop, self.num_tokens))
            state, (cum,) = self.keep_top(state, cum, count, carry=[cum], group=g)
        st.cum = cum
        return state

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """Cuts after every block whose distance to the last-but-one, ``rpl``, is even and >= 0
        (:meth:`after_block`); the entropy-adaptive counts differ per sample."""
        return [layer for layer in range(num_blocks - 1) if (num_blocks - 2 - layer) % 2 == 0], True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ema={self.ema}, shared_count={self.shared_count}"
