"""The hook protocol that prompt learners (``vlm.prompts``) and pruners (``vlm.pruning``) implement.

A tower runner calls, for every block ``layer`` of tower ``tower`` ("vision" or "text"):
``before_block`` -> ``attention_spec`` -> the block (attention via ``vlm.kernels.attention``) ->
``after_block``. Every method is optional: the defaults leave the state and spec unchanged.

The language model of a LLaVA-style model keeps its own attention (SDPA, flash), so it has no
block hooks. Its seam is :class:`LlmStage`: a hook that, after one decoder layer, is shown an
:class:`LlmProbe` (that layer's post-RoPE keys/values of the visual tokens and one probe query per
sample) and says which visual tokens to keep; it may bring a vision-tower hook with it
(``vision_stage``). :func:`split_stages` splits a hook list once into the vision/text hooks and the
LLM stage, which is how the runners consume it.

Per-pass state, one rule for every hook (learners and pruners alike):

* State a hook needs *during* a pass (across blocks of one tower) lives in
  ``state.scratch[hook.scratch_key]``, the dict :meth:`TowerHook.scratch` returns. The state is
  created fresh for every tower pass, so the scratch starts empty: nothing to reset, and nothing
  leaks from one pass (or one tower) into the next.
* Values a hook hands out *after* the pass (to its ``losses``, or to the caller that ran it; e.g. a
  learner's per-block loss terms, a probe's recorded weights) are attributes of the hook, reset in
  :meth:`TowerHook.on_tower_start`. The final state is not handed to the loss, so these cannot live
  in the scratch.
* A hook that needs attention probes *appends* its query rows to ``spec.probe_rows`` with
  :meth:`TowerHook.request_probe` and reads its own rows back with :meth:`TowerHook.read_probe`;
  it never replaces rows another hook asked for, so several probing hooks share one tower.
* Per-block code reads what is static (shapes, settings, the block count) from Python values and
  checks invariants with :func:`vlm.tokens.check` (asynchronous on an accelerator), so the block
  loop does not wait on the device; a remaining host-device sync is marked ``# sync: <why>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vlm.kernels.spec import AttnOutput, AttnSpec
from vlm.tokens import TokenState, TokenType, check


class TowerHook(nn.Module):
    """Base class of everything that plugs into a tower's block loop."""

    #: Towers this hook acts on; the runner skips it for others.
    towers: tuple[str, ...] = ("vision", "text", "llm")
    #: True if the hook reads or writes text positions after the last one that decides the pooled
    #: feature (after EOT in a causal tower, in the padding of a padded one), e.g. tokens appended at
    #: the end of the sequence. The text runners then run the full context instead of cutting it
    #: to the longest prompt of the batch (``vlm.towers.runner.trim_text``).
    needs_full_text: bool = False

    def before_block(self, tower: str, layer: int, state: TokenState) -> TokenState:
        return state

    def attention_spec(self, tower: str, layer: int, state: TokenState, spec: AttnSpec) -> AttnSpec:
        return spec

    def after_block(self, tower: str, layer: int, state: TokenState, attn: AttnOutput) -> TokenState:
        return state

    def on_tower_start(self, tower: str, state: TokenState) -> TokenState:
        """Called once after embedding, before block 0 (e.g. to reset what the hook hands out after
        the pass; its scratch starts empty on its own)."""
        return state

    # --- per-pass scratch (the rule in the module docstring) ----------------------------------
    @property
    def scratch_key(self) -> str:
        """This hook's key in ``state.scratch``."""
        return f"hook.{getattr(self, 'name', '') or type(self).__name__}"

    def scratch(self, state: TokenState) -> dict[str, Any]:
        """This hook's per-pass state (an empty dict at the start of every tower pass)."""
        return state.scratch.setdefault(self.scratch_key, {})

    # --- attention probes ---------------------------------------------------------------------
    def request_probe(self, state: TokenState, spec: AttnSpec, rows: Tensor) -> AttnSpec:
        """Append query rows ``rows [P]`` (long, indices among the block's query tokens) to
        ``spec.probe_rows``; remember where they landed and which keys are key/value-only."""
        rows = rows.to(device=state.x.device, dtype=torch.long)
        start = 0 if spec.probe_rows is None else spec.probe_rows.numel()
        if spec.probe_rows is not None:
            rows = torch.cat([spec.probe_rows.to(rows.device), rows])
        sc = self.scratch(state)
        sc["probe_index"] = start
        sc["probe_count"] = rows.numel() - start
        sc["kv_only"] = state.kv_only
        return spec.replace(probe_rows=rows)

    def read_probe(self, state: TokenState, attn: AttnOutput) -> Tensor:
        """``[B, H, P, Nk]``: the final attention weights of the rows this hook requested in this
        block (over every key of the block, key/value-only ones included)."""
        if attn.probes is None:
            raise RuntimeError(f"{type(self).__name__}: the attention backend returned no probes.")
        sc = self.scratch(state)
        start = sc["probe_index"]
        return attn.probes[:, :, start : start + sc["probe_count"]]

    def key_columns(self, state: TokenState, keys: Tensor) -> Tensor:
        """``keys [..., Nk]`` restricted to the tokens that remain after the block (the key/value-only
        tokens of the block that requested the probe dropped)."""
        kv = self.scratch(state).get("kv_only")
        return keys if kv is None else keys[..., ~kv]  # sync: only with key/value-only tokens (a shape)

    def on_tower_end(self, tower: str, state: TokenState) -> TokenState:
        """Called once after the last block, before the tower's final norm and pooling."""
        return state


def cls_query_row(state: TokenState, who: str = "CLS-based pruning") -> Tensor:
    """long ``[1]``: the query index of the CLS token (key/value-only tokens have no query row),
    which must be the same in every sample. It stays on the device (no host-device sync)."""
    types = state.batch_types
    is_cls = types == int(TokenType.CLS)
    if state.kv_only is not None:
        is_cls = is_cls & ~state.kv_only
    check(is_cls.any(1), f"{who} needs a CLS token in every sample.")
    idx = is_cls.int().argmax(1)
    check(idx == idx[:1], f"{who} needs the CLS token at the same index in every sample.")
    row = idx[:1]
    if state.kv_only is not None:  # key/value-only tokens before CLS take no query row
        row = row - state.kv_only.long().cumsum(0).index_select(0, row)
    return row


def active_hooks(hooks: Iterable[TowerHook] | None, tower: str) -> Sequence[TowerHook]:
    """The hooks that act on ``tower``, in order."""
    return [h for h in (hooks or ()) if tower in h.towers]


class HookList:
    """Runs a list of hooks for one tower, in order, threading state and spec through them."""

    def __init__(self, hooks: Iterable[TowerHook] | None, tower: str) -> None:
        self.tower = tower
        self.hooks = list(active_hooks(hooks, tower))

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def start(self, state: TokenState) -> TokenState:
        for h in self.hooks:
            state = h.on_tower_start(self.tower, state)
        return state

    def before(self, layer: int, state: TokenState) -> TokenState:
        for h in self.hooks:
            state = h.before_block(self.tower, layer, state)
        return state

    def spec(self, layer: int, state: TokenState, spec: AttnSpec) -> AttnSpec:
        for h in self.hooks:
            spec = h.attention_spec(self.tower, layer, state, spec)
        return spec

    def after(self, layer: int, state: TokenState, attn: AttnOutput) -> TokenState:
        for h in self.hooks:
            state = h.after_block(self.tower, layer, state, attn)
        return state

    def end(self, state: TokenState) -> TokenState:
        for h in self.hooks:
            state = h.on_tower_end(self.tower, state)
        return state



@dataclass
class LlmProbe:
    """One decoder layer's attention inputs, per sample, for the probe row and the visual tokens.

    ``query [B, H, d]``: post-RoPE query of the probe token; ``query_value [B, Hkv, d]`` its value;
    ``keys, values [B, Hkv, N, d]``: post-RoPE keys and values of the sample's scored visual tokens
    (layout tokens such as kept ``image_newline`` are not among them) in sequence order, padded to
    the batch maximum N; ``counts [B]`` visual tokens per sample (slots at or after the count are
    padding). ``H = Hkv * G`` with grouped-query attention: query head ``h`` reads key/value head
    ``h // G``, as the model's attention does.
    """

    query: Tensor
    query_value: Tensor
    keys: Tensor
    values: Tensor
    counts: Tensor

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool: the slots that hold a visual token."""
        n = self.keys.shape[2]
        return torch.arange(n, device=self.counts.device)[None] < self.counts[:, None]


class LlmStage(TowerHook):
    """A hook on the language model: one cut of the visual tokens after decoder layer ``layer``.

    Implementations set ``layer`` (the decoder layer, 0-based, whose attention inputs are scored
    and after which the cut happens) and ``vision_stage`` (a vision-tower hook run before this
    stage, e.g. a first vision-side cut, or None) and implement :meth:`keep`. The runner owns
    positions, masks and the KV-cache split; a stage only chooses.
    """

    towers = ("llm",)
    #: whether LLaVA-NeXT's packing keeps its ``image_newline`` tokens when this stage runs; kept
    #: newlines are layout: never scored, never cut, outside the budget.
    anyres_newlines: bool = True

    def keep(self, probe: LlmProbe) -> Tensor:
        """``[B, N]`` bool: the visual slots of ``probe`` to keep (padding slots are ignored)."""
        raise TypeError(f"{type(self).__name__} is an LlmStage but does not implement keep(probe).")


@dataclass(frozen=True)
class StageHooks:
    """A hook list split once: the vision/text ``hooks`` (an LLM stage's ``vision_stage`` in its
    place) and the one ``llm`` stage, or None."""

    hooks: tuple[TowerHook, ...]
    llm: Optional[LlmStage]


def split_stages(hooks: Union[Iterable[TowerHook], StageHooks, None]) -> StageHooks:
    """Split ``hooks`` into :class:`StageHooks` (idempotent: a split list is returned as it is).
    At most one LLM stage per pass."""
    if isinstance(hooks, StageHooks):
        return hooks
    tower: list[TowerHook] = []
    stages: list[LlmStage] = []
    for h in hooks or ():
        if isinstance(h, LlmStage):
            stages.append(h)
            vision = getattr(h, "vision_stage", None)
            if vision is not None:
                tower.append(vision)
        else:
            tower.append(h)
    if len(stages) > 1:
        raise ValueError(f"At most one LLM-stage pruner (hook) per pass, got {[type(h).__name__ for h in stages]}.")
    return StageHooks(tuple(tower), stages[0] if stages else None)
