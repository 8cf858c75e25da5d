"""The pruner interface: a vision-tower :class:`~vlm.hooks.TowerHook` that scores and drops tokens.

A pruner reads what it needs from the block loop, never from an eager attention matrix:

* the CLS row of the attention probabilities, by adding the CLS query to ``AttnSpec.probe_rows``
  in :meth:`attention_spec` (the kernels return it in ``AttnOutput.probes``; the fused paths
  recompute it from the row logsumexp in O(N d));
* the attention values, when it puts ``SCRATCH_VALUES`` into ``state.scratch`` (a pruner that scores by the values).

It cuts by gathering tokens (:meth:`TokenPruner.keep_top`): every valid non-patch token (CLS,
registers, prompts) is kept, and the ``count`` best-scored patches of each sample; the kept tokens
stay in their original (raster) order. Counts may differ per sample; the state is then ragged
(``lengths``), so a sample's result never depends on its neighbours in the batch. Per-pass state
lives in the hook's scratch (``state.scratch["pruner.<name>"]``, the rule in ``vlm.hooks``); the
module itself holds none.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from vlm.hooks import TowerHook, cls_query_row
from vlm.kernels import AttnOutput, AttnSpec
from vlm.tokens import SCRATCH_NUM_BLOCKS, TokenState, TokenType


class TokenPruner(TowerHook):
    """Base class of all pruners. Subclasses register a short name in ``vlm.pruning``.

    Args:
        num_tokens: patch tokens kept per image (CLS and other non-patch tokens are extra).
    """

    towers = ("vision",)
    #: Short registry name, set by ``@register``.
    name: str = ""

    def __init__(self, num_tokens: int = 64) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"{type(self).__name__}: num_tokens must be >= 1, got {num_tokens}.")
        self.num_tokens = int(num_tokens)

    # --- per-pass scratch (vlm.hooks: one rule for every hook) --------------------------------
    @property
    def scratch_key(self) -> str:
        return f"pruner.{self.name}"

    @staticmethod
    def num_blocks(state: TokenState) -> int:
        if SCRATCH_NUM_BLOCKS not in state.scratch:
            raise RuntimeError("pruners run inside vlm.towers.runner.run_blocks (it sets the block count).")
        return int(state.scratch[SCRATCH_NUM_BLOCKS])

    @classmethod
    def resolve_layer(cls, layer: int, state: TokenState) -> int:
        """A layer index, negative ones counted from the end of the blocks this pass runs."""
        n = cls.num_blocks(state)
        idx = layer if layer >= 0 else n + layer
        if not 0 <= idx < n:
            raise ValueError(f"layer {layer} is out of range for a tower pass of {n} blocks.")
        return idx

    # --- probes -------------------------------------------------------------------------------
    @staticmethod
    def cls_row(state: TokenState) -> Tensor:
        """long ``[1]``: query index of the CLS token (the same in every sample), on the device."""
        return cls_query_row(state)

    def request_cls_probe(self, state: TokenState, spec: AttnSpec) -> AttnSpec:
        """Append the CLS query row to ``spec.probe_rows`` (:meth:`~vlm.hooks.TowerHook.request_probe`)."""
        return self.request_probe(state, spec, self.cls_row(state))

    def cls_attention(self, state: TokenState, attn: AttnOutput) -> Tensor:
        """``[B, N]`` head-mean CLS-row attention over the tokens after the block."""
        probe = self.read_probe(state, attn)[:, :, 0].mean(1)  # [B, Nk]
        return self.key_columns(state, probe)

    # --- the cut ------------------------------------------------------------------------------
    @staticmethod
    def keep_top(
        state: TokenState, scores: Tensor, count: Union[int, Tensor], carry: Optional[list[Tensor]] = None
    ) -> tuple[TokenState, list[Tensor]]:
        """Keep every valid non-patch token and the ``count`` top-scored patches per sample.

        ``scores [B, N]`` (only patch entries are read); ``count`` an int or long ``[B]``. Ties keep
        the earlier token. Kept tokens stay in sequence order. ``carry`` are ``[B, N]`` per-token
        tensors gathered along (e.g. cumulative scores). Returns the new state and ``carry``.
        """
        b, n = scores.shape
        valid = state.valid_mask()
        patch = state.type_mask(TokenType.PATCH)
        count_t = torch.as_tensor(count, device=scores.device).expand(b).clamp(max=patch.sum(1))
        masked = scores.float().masked_fill(~patch, float("-inf"))
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
        keep = (valid & ~patch) | (patch & (rank < count_t[:, None]))
        kept = keep.sum(1)
        # sync: one read of three facts the cut's shapes depend on (whether anything is dropped, the
        # widest kept row, whether rows differ), instead of one sync each
        dropping, widest, uneven = torch.stack([(keep != valid).any().long(), kept.max(), (kept != kept[0]).any().long()]).tolist()
        if not dropping:  # nothing to drop (e.g. an entropy cut of 0): no gather
            return state, list(carry or [])
        index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :widest]
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

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_tokens={self.num_tokens}"
