"""VisionZip: "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(Yang, Chen, Tian, Wang, Li, Yu, Jia, CVPR 2025, arXiv 2412.04467); released code:
github.com/dvlab-research/VisionZip (``visionzip/clip_encoder.py``, ``visionzip/utils.py``).

One cut, after the vision tower's feature layer (LLaVA: the penultimate CLIP layer, hidden state
-2, which is the last block our runner runs; ``layer=-1`` here). With the block's input ``h``, its
output ``y`` (the feature layer's hidden states, after the MLP), its CLS attention row ``A_{h,CLS,j}``
and its keys ``k_{h,j}`` (the raw ``k_proj`` of the normalised input: bias, no scale), per image:

1. Dominant tokens. ``s_j = sum_h A_{h,CLS,j}`` over the patches (the code sums over heads; the
   ranking is the head mean's); keep the ``D`` best patches, in raster order, and CLS.
2. Contextual tokens. The other ``R`` patches, in raster order, ``r = 0..R-1``; metric
   ``m_j = kbar_j / ||kbar_j||`` with ``kbar_j = (1/H) sum_h k_{h,j}`` (the head mean of the keys).
   Anchors (the code's "targets"): ``step = max(1, R // C)``, ranks ``0, step, 2 step, ...``, the
   first ``C``. Every other remaining patch ``i`` goes to ``t(i) = argmax_t m_i . m_t`` (cosine;
   ties: the first anchor). An anchor's token is

       c_t = y_t + (1 / max(n_t, 1)) sum_{i: t(i) = t} y_i       (``merge="released"``)

   with ``n_t`` the patches assigned to it: the anchor is *added* to the mean of its assigned tokens,
   it does not count itself (an anchor nothing joins stays ``y_t``).
3. Output, as the code concatenates it: CLS, the dominant patches in raster order, then the
   contextual tokens in anchor (raster) order. A contextual token keeps its anchor's position.

Budget. ``num_tokens`` counts the patches that leave the tower (the pruners' contract; CLS is
extra, and LLaVA's runner drops it). ``contextual`` defaults to the released ratio, 10 of 64
(``round(num_tokens * 10 / 64)``: 54 + 10, 108 + 20, 162 + 30, the paper's splits for 64, 128 and
192 tokens), and ``D = num_tokens - contextual``.

Where the released code and the paper differ (we follow the code; the flags give the alternative):

* The released ``dominant`` counts CLS: ``visionzip(model, dominant=54, contextual=10)`` keeps CLS +
  53 patches + 10 contextual tokens = 64 tokens, CLS among them, since its LLaVA patch does not
  drop CLS. Our default spends the 64 on patches (``D = 54``: CLS is a non-patch token, and the
  LLaVA runner drops it under the ``default`` feature strategy). ``cls_in_budget=True`` takes one
  dominant slot for CLS (``D = num_tokens - contextual - 1``), the released patch selection; with
  LLaVA's ``full`` feature strategy (CLS kept) the LLM then sees the released 64 tokens in order.
* The paper merges each group by averaging; the code adds the anchor to the mean of the others
  (above). ``merge="mean"``: ``c_t = (y_t + sum_i y_i) / (1 + n_t)``, the anchor counted once.
* Emission order: the code emits dominant tokens then contextual ones; ``raster_order=True`` emits
  every kept token in order of its position (the framework's usual order).
* The similarity uses the head-mean keys of the feature layer (the code's ``raw_key_states.mean(1)``),
  not the hidden states; the merged vectors are the layer's output hidden states.
* LLaVA-NeXT: the released code scatters each crop's dominant patches back onto the grid (no
  ``image_newline``) and appends every crop's CLS and contextual tokens after it; our NeXT runner
  packs every kept token at its position, so a contextual token sits at its anchor's place.

Differences from the released code that are not choices: scores come from the CLS probe row of the
fused attention (``AttnSpec.probe_rows``), not an eager attention matrix; the keys are re-projected
with the block's own ``attn_input``/``qkv`` before the block runs (one extra projection at the cut
block); any batch size works and a sample never depends on its neighbours (ties of equal scores
keep the earlier patch, where ``torch.topk`` leaves them unspecified); a budget above the patches
keeps every patch.

Towers without a CLS token (Qwen2.5-VL, Qwen3-VL) are refused: the released code only patches
CLIP with CLS, and dominant selection is defined by the CLS row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from vlm.context import BlockContext, resolve_layer
from vlm.kernels import AttnOutput, AttnSpec
from vlm.pruning.base import TokenPruner, top_count
from vlm.pruning.registry import register
from vlm.tokens import TokenState, TokenType, kept_first

#: the released split: 10 contextual tokens of 64 (54 + 10, 108 + 20, 162 + 30)
CONTEXTUAL_RATIO = 10 / 64
MERGES = ("released", "mean")


@register("visionzip")
class VisionZip(TokenPruner):
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity.

    Args:
        num_tokens: patch tokens that leave the tower per image (or crop): dominant + contextual.
        contextual: contextual (merged) tokens among them; None: ``round(num_tokens * 10 / 64)``.
        layer: the block scored and cut after (default: the last block of the pass, LLaVA's feature
            layer).
        cls_in_budget: CLS takes one dominant slot, as the released ``dominant`` argument counts it.
        merge: ``"released"`` (anchor + mean of its assigned tokens) or ``"mean"`` (the paper's
            average of the anchor and its assigned tokens).
        raster_order: emit kept tokens in position order instead of dominant-then-contextual.
    """

    runs_on_merge_units = False  # scores by the CLS row: Qwen's towers have none

    def __init__(
        self,
        num_tokens: int = 64,
        contextual: Optional[int] = None,
        layer: int = -1,
        cls_in_budget: bool = False,
        merge: str = "released",
        raster_order: bool = False,
    ) -> None:
        super().__init__(num_tokens)
        if contextual is None:
            contextual = int(round(num_tokens * CONTEXTUAL_RATIO))
        dominant = num_tokens - contextual - int(cls_in_budget)
        if contextual < 0 or dominant < 0:
            raise ValueError(
                f"VisionZip: contextual={contextual} must be in 0..{num_tokens - int(cls_in_budget)} "
                f"(num_tokens={num_tokens}{', one slot taken by CLS' if cls_in_budget else ''})."
            )
        if merge not in MERGES:
            raise ValueError(f"VisionZip: merge={merge!r} is not one of {MERGES}.")
        self.contextual = int(contextual)
        self.dominant = int(dominant)
        self.layer = layer
        self.cls_in_budget = bool(cls_in_budget)
        self.merge = merge
        self.raster_order = bool(raster_order)
        self.keeps_raster_order = self.raster_order

    @dataclass
    class PassState:
        """``keys``: head-mean keys ``[B, N, d]`` of the cut block's tokens (after the block)."""

        keys: Optional[Tensor] = None

    def _check_tower(self, ctx: BlockContext, state: TokenState) -> None:
        if not ctx.has_cls(state.types) or ctx.token_group != 1:
            raise TypeError(
                f"{type(self).__name__} selects its dominant tokens by the CLS token's attention, but this "
                f"vision tower has no CLS token (token_group={ctx.token_group}: e.g. Qwen2.5-VL/Qwen3-VL), and "
                "the released code has no port for such towers. Use it on a tower with CLS (LLaVA-1.5/NeXT's "
                "CLIP, open_clip, timm ViT), or choose a pruner that supports CLS-free towers (cls_attention, "
                "vtc_cls, flowcut score with the mean query)."
            )

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return spec
        self._check_tower(ctx, state)
        spec = self.request_cls_probe(ctx, state, spec)
        _, k, _ = ctx.block.qkv(ctx.block.attn_input(state.x))  # [B, H, N, d]: the block's own keys
        ctx.state(self).keys = self.key_columns(ctx, k.float().mean(1), dim=1)
        return spec

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        score = self.key_columns(ctx, self.read_probe(ctx, attn)[:, :, 0].sum(1))  # [B, N]
        keys = ctx.state(self).keys
        ctx.state(self).keys = None
        return self.zip(state, score, keys)

    def zip(self, state: TokenState, score: Tensor, keys: Tensor) -> TokenState:
        """The cut on the block's output ``state``: ``score [B, N]`` (CLS attention summed over
        heads), ``keys [B, N, d]`` (head-mean keys). Dominant selection, anchor merging, emission."""
        b, n, dim = state.x.shape
        device = state.x.device
        valid = state.valid_mask()
        patch = state.type_mask(TokenType.PATCH)
        count = patch.sum(1)
        # 1. dominant: the D best patches (ties: the earlier)
        dom_count = count.clamp(max=self.dominant)
        dom = patch & top_count(score.float().masked_fill(~patch, float("-inf")), dom_count)
        # 2. anchors: every step-th of the remaining patches in sequence order, the first C
        rest = patch & ~dom
        rest_count = rest.sum(1)
        ctx_count = rest_count.clamp(max=self.contextual)
        rank = rest.long().cumsum(1) - 1
        step = (rest_count // ctx_count.clamp(min=1)).clamp(min=1)[:, None]
        anchor = rest & (rank % step == 0) & (rank // step < ctx_count[:, None])
        merged = rest & ~anchor
        x = state.x
        if self.contextual > 0:
            width = self.contextual
            slots = kept_first(anchor, width)  # [B, C] anchor indices (padded by other indices)
            slot_ok = torch.arange(width, device=device)[None] < anchor.sum(1, keepdim=True)
            m = keys.float()
            m = m / m.norm(dim=-1, keepdim=True)
            targets = torch.gather(m, 1, slots[..., None].expand(-1, -1, m.shape[-1]))  # [B, C, d]
            sim = torch.einsum("bnd,bcd->bnc", m, targets).masked_fill(~slot_ok[:, None], float("-inf"))
            assign = sim.argmax(-1)  # [B, N]: the slot of each token's most similar anchor
            weight = merged.float()
            y = x.float()
            sums = torch.zeros(b, width, dim, device=device).scatter_add_(1, assign[..., None].expand(-1, -1, dim), y * weight[..., None])
            sizes = torch.zeros(b, width, device=device).scatter_add_(1, assign, weight)
            base = torch.gather(y, 1, slots[..., None].expand(-1, -1, dim))
            if self.merge == "released":
                ctx_tokens = base + sums / sizes.clamp(min=1)[..., None]
            else:
                ctx_tokens = (base + sums) / (1 + sizes)[..., None]
            # write the contextual tokens over their anchors (padding slots write nothing)
            slots = torch.where(slot_ok, slots, n)
            x = torch.cat([x, x.new_zeros(b, 1, dim)], 1)
            x = x.scatter(1, slots[..., None].expand(-1, -1, dim), ctx_tokens.to(x.dtype))[:, :n]
        # 3. emission: non-patch and dominant tokens, then the contextual ones, each in sequence order
        keep = (valid & ~patch) | dom | anchor
        kept = keep.sum(1)
        order = torch.where(keep, 0, 2) if self.raster_order else torch.where(anchor, 1, torch.where(keep, 0, 2))
        widest, uneven = torch.stack([kept.max(), (kept != kept[0]).any().long()]).tolist()  # sync: shapes
        index = torch.sort(order.to(torch.int8), dim=1, stable=True).indices[:, :widest]
        new = state.replace(x=x).select(index)
        ragged = state.lengths is not None or bool(uneven)
        return new.replace(lengths=kept if ragged else None)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, dominant={self.dominant}, contextual={self.contextual}, layer={self.layer}, "
            f"cls_in_budget={self.cls_in_budget}, merge={self.merge!r}, raster_order={self.raster_order}"
        )

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``, the same count for every sample."""
        return [resolve_layer(self.layer, num_blocks)], False
