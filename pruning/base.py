"""The pruner interface: a vision-tower :class:`~vlm.hooks.TowerHook` that scores and drops tokens.

A pruner reads what it needs from the block loop, never from an eager attention matrix:

* the CLS row of the attention probabilities, by adding the CLS query to ``AttnSpec.probe_rows``
  in :meth:`attention_spec` (the kernels return it in ``AttnOutput.probes``; the fused paths
  recompute it from the row logsumexp in O(N d));
* the attention values, by setting ``AttnSpec.return_values`` (they come back in ``AttnOutput.values``).

It cuts by gathering tokens (:meth:`TokenPruner.keep_top`): every valid non-patch token (CLS,
registers, prompts) is kept, and the ``count`` best-scored patches of each sample; the kept tokens
stay in their original (raster) order. Counts may differ per sample; the state is then ragged
(``lengths``), so a sample's result never depends on its neighbours in the batch. Per-pass state
lives in the pruner's ``PassState`` (``ctx.state(self)``, the rule in ``vlm.hooks``); the module
itself holds none.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from vlm.context import BlockContext, Tower
from vlm.hooks import TowerHook, cls_query_row
from vlm.kernels import AttnOutput, AttnSpec
from vlm.tokens import TokenState, TokenType, kept_first


def top_count(scores: Tensor, count: Tensor) -> Tensor:
    """bool ``[B, N]``: the ``count[b]`` highest ``scores [B, N]`` of each row (ties keep the
    earlier token). The one rank-top-k rule of the pruners."""
    b, n = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    return rank < count[:, None]


def top_groups(scores: Tensor, patch: Tensor, count: Union[int, Tensor], group: int) -> Tensor:
    """bool ``[B, N]``: the patches of the ``count`` best groups per row, a group being ``group``
    consecutive patches (``patch [B, N]`` marks them) scored by the mean of its patches' ``scores``."""
    b, n = scores.shape
    gid = (patch.long().cumsum(1) - 1).clamp(min=0) // group  # group of each patch, in order
    width = (n + group - 1) // group
    member = patch.float()
    sums = torch.zeros(b, width, device=scores.device).scatter_add_(1, gid, torch.where(patch, scores, 0.0) * member)
    sizes = torch.zeros(b, width, device=scores.device).scatter_add_(1, gid, member)
    mean = (sums / sizes.clamp(min=1)).masked_fill(sizes == 0, float("-inf"))
    counts = torch.as_tensor(count, device=scores.device).expand(b).clamp(max=(sizes > 0).sum(1))
    return patch & torch.gather(top_count(mean, counts), 1, gid)


class Pruner(TowerHook):
    """Base of every pruner, vision- or LLM-stage: a registry name and a token budget.

    Args:
        num_tokens: tokens kept per image (or crop); non-patch tokens (CLS, registers, prompts)
            are extra.
    """

    #: Short registry name, set by ``@register``.
    name: str = ""

    def __init__(self, num_tokens: int = 64) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"{type(self).__name__}: num_tokens must be >= 1, got {num_tokens}.")
        self.num_tokens = int(num_tokens)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_tokens={self.num_tokens}"


class TokenPruner(Pruner):
    """Base of the vision-tower pruners: CLS probes and the cut. Subclasses register a short name
    in ``vlm.pruning``."""

    towers = (Tower.VISION,)
    #: whether it runs on a tower without a CLS token whose patches merge in groups (Qwen's 2x2
    #: units, ``ctx.token_group > 1``). False for a method that needs the CLS row or the patch grid:
    #: such a backbone refuses it when the model is built (``check_budget``), naming the fix.
    runs_on_merge_units: bool = True
    #: whether the kept tokens leave the cut in their original (raster) order; a method that emits
    #: them in another order (e.g. kept tokens, then merged ones) says so here.
    keeps_raster_order: bool = True

    # --- probes -------------------------------------------------------------------------------
    @staticmethod
    def cls_row(state: TokenState) -> Tensor:
        """long ``[1]``: query index of the CLS token (the same in every sample), on the device."""
        return cls_query_row(state)

    def request_cls_probe(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        """Ask for the CLS query row (:meth:`~vlm.hooks.TowerHook.request_probe`). A tower without a
        CLS token (Qwen's) gets its stand-in instead: the mean of the sample's queries
        (:meth:`~vlm.hooks.TowerHook.request_mean_probe`), the global query of the released Qwen ports."""
        if not ctx.has_cls(state.types):
            return self.request_mean_probe(ctx, state, spec)
        return self.request_probe(ctx, state, spec, self.cls_row(state))

    def cls_attention(self, ctx: BlockContext, attn: AttnOutput) -> Tensor:
        """``[B, N]`` head-mean CLS-row (or mean-query) attention over the tokens after the block."""
        probe = self.read_probe(ctx, attn)[:, :, 0].mean(1)  # [B, Nk]
        return self.key_columns(ctx, probe)

    # --- the cut ------------------------------------------------------------------------------
    @staticmethod
    def keep_top(
        state: TokenState,
        scores: Tensor,
        count: Union[int, Tensor],
        carry: Optional[list[Tensor]] = None,
        group: int = 1,
    ) -> tuple[TokenState, list[Tensor]]:
        """Keep every valid non-patch token and the ``count`` top-scored patches per sample.

        ``scores [B, N]`` (only patch entries are read); ``count`` an int or long ``[B]``. Ties keep
        the earlier token. Kept tokens stay in sequence order. ``carry`` are ``[B, N]`` per-token
        tensors gathered along (e.g. cumulative scores). Returns the new state and ``carry``.
        ``group > 1`` (``ctx.token_group``: consecutive patches that become one output token, as
        Qwen's 2x2 merge units): a group scores the mean of its patches, ``count`` counts groups,
        and whole groups are kept or dropped.
        """
        b = scores.shape[0]
        valid = state.valid_mask()
        patch = state.type_mask(TokenType.PATCH)
        masked = scores.float().masked_fill(~patch, float("-inf"))
        if group == 1:
            count_t = torch.as_tensor(count, device=scores.device).expand(b).clamp(max=patch.sum(1))
            keep = (valid & ~patch) | (patch & top_count(masked, count_t))
        else:
            keep = (valid & ~patch) | (patch & top_groups(masked, patch, count, group))
        kept = keep.sum(1)
        # sync: one read of three facts the cut's shapes depend on (whether anything is dropped, the
        # widest kept row, whether rows differ), instead of one sync each
        dropping, widest, uneven = torch.stack([(keep != valid).any().long(), kept.max(), (kept != kept[0]).any().long()]).tolist()
        if not dropping:  # nothing to drop (e.g. an entropy cut of 0): no gather
            return state, list(carry or [])
        index = kept_first(keep, widest)
        new = state.select(index)
        ragged = state.lengths is not None or bool(uneven)
        new = new.replace(lengths=kept if ragged else None)
        return new, [torch.gather(t, 1, index) for t in (carry or [])]

    # --- declarations read by vlm.runtime.reliability.check_hooks ---------------------------------------
    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """(the blocks after which this pruner may cut, in a pass of ``num_blocks`` blocks; whether
        the kept counts may differ per sample). The default is the safe assumption: any block,
        ragged. Pruners override it from their own settings."""
        return list(range(num_blocks)), True
