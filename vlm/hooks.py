"""The hook protocol that prompt learners (``vlm.prompts``) and pruners (``vlm.pruning``) implement.

A tower runner (``vlm.towers.runner.TowerPass``) calls, for every block of a pass:
``before_block`` -> ``attention_spec`` -> the block (attention via ``vlm.kernels.attention``) ->
``after_block``; ``on_tower_start`` once after embedding and ``on_tower_end`` once after the last
block. Every method is optional: the defaults leave the state and spec unchanged.

What a hook may use comes as typed values (``vlm.context``): ``ctx.tower`` (a :class:`Tower`),
``ctx.layer`` and ``ctx.num_layers``, ``ctx.block`` (the block's own norm and projections),
``ctx.image_index``. A hook never reaches back into the backbone or a datamodule during a pass.

Per-pass state, one rule for every hook (learners and pruners alike):

* State a hook needs *during* a pass (across blocks of one tower) is its ``PassState`` dataclass,
  read with ``ctx.state(self)``: created fresh for every pass, so there is nothing to reset and
  nothing leaks from one pass (or one tower) into the next.
* Values a hook hands out *after* the pass (to its ``losses``, or to the caller that ran it; e.g. a
  learner's per-block loss terms, a probe's recorded weights) are attributes of the hook, reset in
  :meth:`TowerHook.on_tower_start`.
* A hook that needs attention probes *appends* its query rows to ``spec.probe_rows`` with
  :meth:`TowerHook.request_probe` and reads its own rows back with :meth:`TowerHook.read_probe`;
  it never replaces rows another hook asked for, so several probing hooks share one tower. A hook
  that needs the block's attention values sets ``spec.return_values`` and reads
  ``AttnOutput.values``.
* Per-block code reads what is static (shapes, settings, the block count) from Python values and
  checks invariants with :func:`vlm.tokens.check` (asynchronous on an accelerator), so the block
  loop does not wait on the device; a remaining host-device sync is marked ``# sync: <why>``.

The language model's seam is :class:`vlm.llm_stage.LlmStage` (a hook that chooses visual tokens
after one decoder layer), in its own module.
"""

from __future__ import annotations

from typing import ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from vlm.context import BlockContext, ProbeSlot, Tower, TowerContext
from vlm.kernels.spec import AttnOutput, AttnSpec
from vlm.tokens import TokenState, TokenType, check

__all__ = ["TowerHook", "Tower", "TowerContext", "BlockContext", "active_hooks", "cls_query_row"]


class TowerHook(nn.Module):
    """Base class of everything that plugs into a tower's block loop."""

    #: Towers this hook acts on; the runner skips it for others.
    towers: tuple[Tower, ...] = (Tower.VISION, Tower.TEXT, Tower.LLM)
    #: The hook's per-pass state (a dataclass with defaults), or None if it keeps none.
    PassState: ClassVar[Optional[type]] = None
    #: True if the hook reads or writes text positions after the last one that decides the pooled
    #: feature (after EOT in a causal tower, in the padding of a padded one), e.g. tokens appended at
    #: the end of the sequence. The text runners then run the full context instead of cutting it
    #: to the longest prompt of the batch (``vlm.towers.runner.trim_text``).
    needs_full_text: bool = False

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        """Called once after embedding, before block 0 (e.g. to reset what the hook hands out after
        the pass; its ``PassState`` starts fresh on its own)."""
        return state

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        return state

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        return spec

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        return state

    def on_tower_end(self, ctx: TowerContext, state: TokenState) -> TokenState:
        """Called once after the last block, before the tower's final norm and pooling."""
        return state

    # --- attention probes ---------------------------------------------------------------------
    def request_probe(self, ctx: BlockContext, state: TokenState, spec: AttnSpec, rows: Tensor) -> AttnSpec:
        """Append query rows ``rows [P]`` (long, indices among the block's query tokens) to
        ``spec.probe_rows``; remember where they landed and which keys are key/value-only."""
        rows = rows.to(device=state.x.device, dtype=torch.long)
        start = 0 if spec.probe_rows is None else spec.probe_rows.numel()
        if spec.probe_rows is not None:
            rows = torch.cat([spec.probe_rows.to(rows.device), rows])
        ctx.set_probe(self, ProbeSlot(start, rows.numel() - start, state.kv_only))
        return spec.replace(probe_rows=rows)

    def request_mean_probe(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        """Ask for the weights of each sample's mean query (``AttnSpec.probe_mean_query``): a global
        query row for towers without a CLS token, read back by :meth:`read_probe` as one row."""
        ctx.set_probe(self, ProbeSlot(0, 1, state.kv_only, mean=True))
        return spec.replace(probe_mean_query=True)

    def read_probe(self, ctx: BlockContext, attn: AttnOutput) -> Tensor:
        """``[B, H, P, Nk]``: the final attention weights of the rows this hook requested in this
        block (over every key of the block, key/value-only ones included); ``P = 1`` for the
        mean query."""
        slot = ctx.probe(self)
        if slot.mean:
            if attn.mean_probe is None or not isinstance(attn.mean_probe, Tensor):
                raise RuntimeError(f"{type(self).__name__}: the block returned no padded mean-query probe.")
            return attn.mean_probe[:, :, None]
        if attn.probes is None:
            raise RuntimeError(f"{type(self).__name__}: the attention backend returned no probes.")
        return attn.probes[:, :, slot.start : slot.start + slot.count]

    def key_columns(self, ctx: BlockContext, keys: Tensor, dim: int = -1) -> Tensor:
        """``keys`` restricted along ``dim`` (the block's keys) to the tokens that remain after the
        block: the key/value-only tokens of the block that requested the probe dropped."""
        kv = ctx.probe(self).kv_only
        if kv is None:
            return keys
        return keys.index_select(dim, (~kv).nonzero().flatten())  # sync: only with key/value-only tokens (a shape)


def cls_query_row(state: TokenState, who: str = "CLS-based pruning") -> Tensor:
    """long ``[1]``: the query index of the CLS token (key/value-only tokens have no query row),
    which must be the same in every sample. It stays on the device (no host-device sync)."""
    types = state.batch_types
    is_cls = types == int(TokenType.CLS)
    if state.kv_only is not None:
        is_cls = is_cls & ~state.kv_only
    check(is_cls.any(1), f"{who} needs a CLS token in every sample; this vision tower has none (attention-pooled, "
                         "e.g. SigLIP). Use a CLS-token backbone, or a setting of the method that reads no CLS attention.")
    idx = is_cls.int().argmax(1)
    check(idx == idx[:1], f"{who} needs the CLS token at the same index in every sample.")
    row = idx[:1]
    if state.kv_only is not None:  # key/value-only tokens before CLS take no query row
        row = row - state.kv_only.long().cumsum(0).index_select(0, row)
    return row


def active_hooks(hooks: Optional[Iterable[TowerHook]], tower: Tower) -> Sequence[TowerHook]:
    """The hooks that act on ``tower``, in order."""
    return [h for h in (hooks or ()) if tower in h.towers]
