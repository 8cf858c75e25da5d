"""The language model's seam: a hook that, after one or more decoder layers, chooses the visual tokens to keep.

The language model of a LLaVA-style model keeps its own attention (SDPA, flash), so it has no
block hooks. An :class:`LlmStage` is shown an :class:`LlmProbe` (that layer's post-RoPE keys and
values of the visual tokens and one probe query per sample) at each of its cuts (:meth:`LlmStage.cuts`)
and says which visual tokens to keep;
it may bring a vision-tower hook with it (``vision_stage``). :func:`split_stages` splits a hook
list once into the vision/text hooks and the LLM stage, which is how the runners consume it. The
runner (``vlm.towers.language_model.CutDecoder``) owns positions, masks and the KV-cache split.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from vlm.context import Tower
from vlm.hooks import TowerHook


class ProbeField(Enum):
    """An optional group of :class:`LlmProbe` fields. A stage lists the groups it reads in
    :attr:`LlmStage.probe_fields` and the runner computes only those (each costs gathers, norms or
    projections over the sequence at every cut); the others stay None."""

    #: ``values``, ``query_value`` (with ``score_next``, the values are a projection of every token)
    VALUES = "values"
    #: ``query_lse`` (for :meth:`LlmProbe.row_weights`)
    QUERY_LSE = "query_lse"
    #: ``hidden``: final-normed output states of the visual slots
    HIDDEN = "hidden"
    #: ``states``: output states of the visual slots (what :meth:`LlmStage.merge_stage` averages)
    STATES = "states"
    #: ``text_keys``, ``text_hidden``, ``text_counts``: the prompt tail's keys and normed states
    TEXT = "text"
    #: ``text_queries``, ``text_lse``, ``text_weights``, ``text_counts`` (for :meth:`LlmProbe.text_row_weights`)
    TEXT_ROWS = "text_rows"
    #: ``embeds``, ``text_embeds``, ``text_counts``: input embeddings of the visual tokens and prompt tail
    EMBEDS = "embeds"


#: every optional group: what a stage that declares nothing is given
ALL_PROBE_FIELDS: frozenset[ProbeField] = frozenset(ProbeField)


@dataclass
class LlmProbe:
    """One decoder layer's attention inputs, per sample, for the probe row and the visual tokens.

    ``query [B, H, d]``: post-RoPE query of the probe token; ``query_value [B, Hkv, d]`` its value;
    ``keys, values [B, Hkv, N, d]``: post-RoPE keys and values of the sample's scored visual tokens
    (the values and ``query_value`` only under :attr:`ProbeField.VALUES`)
    (layout tokens such as kept ``image_newline`` are not among them) in sequence order, padded to
    the batch maximum N; ``counts [B]`` visual tokens per sample (slots at or after the count are
    padding). ``H = Hkv * G`` with grouped-query attention: query head ``h`` reads key/value head
    ``h // G``, as the model's attention does.

    Optional fields (None where the runner does not fill them; ``CutDecoder`` fills ``scale`` and
    ``initial_counts`` always, the others where the stage's ``probe_fields`` lists their
    :class:`ProbeField`):

    * ``scale``: the layer's attention logit scale (``scaling``, ``d ** -0.5`` on Llama/Qwen);
    * ``query_lse [B, H]`` (fp32): per head, the log-sum-exp of the probe row's scaled logits
      ``scale * q_h . k_{h,j}`` over every key of its causal row (all the sample's tokens up to and
      including the probe: text, visual and layout ones), i.e. the normaliser of the layer's own
      attention softmax for that row; ``exp(scale * q_h . k_{h,j} - query_lse_h)`` is the weight the
      layer gives token ``j``. Computed from the probe row alone (no attention matrix);
    * ``hidden [B, N, D]``: the layer's output hidden states at the visual slots, passed through the
      language model's final norm (padding slots are zeros);
    * ``text_keys [B, Hkv, T, d]``, ``text_hidden [B, T, D]``, ``text_counts [B]``: the same keys and
      normed output states for the sample's prompt tail, the non-visual tokens after its last visual
      token up to and including the probe row, in order, padded to the batch maximum T;
    * ``initial_counts [B]``: the scored visual tokens each sample had before the stage's first cut
      (equal to ``counts`` at the first cut; a later cut of a multi-cut stage sees the survivors of
      the previous one in ``counts``);
    * ``text_queries [B, H, T, d]``, ``text_lse [B, H, T]`` (fp32): the post-RoPE queries of the
      prompt-tail rows, re-projected as the probe's, and per head the log-sum-exp of each such row's
      scaled logits over its own causal row (the tokens of the sample up to and including that row),
      so ``exp(scale * q_{h,t} . k_{h,j} - text_lse_{h,t})`` is the weight row ``t`` gives token ``j``
      (:meth:`text_row_weights`); ``text_weights [B, H, T, N]`` (fp32): those weights on the visual
      slots, which the runner takes from the logits it computed for ``text_lse`` (what
      :meth:`text_row_weights` returns when set);
    * ``states [B, N, D]``: the layer's output hidden states at the visual slots, before the final
      norm (padding slots are zeros): what a merge (:meth:`LlmStage.merge_stage`) averages;
    * ``embeds [B, N0, D]``, ``text_embeds [B, T, D]``: the language model's input embeddings of the
      sample's scored visual tokens before the first cut (``initial_counts`` of them, padded with
      zeros) and of its prompt tail.
    """

    query: Tensor
    query_value: Optional[Tensor]
    keys: Tensor
    values: Optional[Tensor]
    counts: Tensor
    scale: Optional[float] = None
    query_lse: Optional[Tensor] = None
    hidden: Optional[Tensor] = None
    text_keys: Optional[Tensor] = None
    text_hidden: Optional[Tensor] = None
    text_counts: Optional[Tensor] = None
    initial_counts: Optional[Tensor] = None
    states: Optional[Tensor] = None
    text_queries: Optional[Tensor] = None
    text_lse: Optional[Tensor] = None
    text_weights: Optional[Tensor] = None
    embeds: Optional[Tensor] = None
    text_embeds: Optional[Tensor] = None

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool: the slots that hold a visual token."""
        n = self.keys.shape[2]
        return torch.arange(n, device=self.counts.device)[None] < self.counts[:, None]

    def row_weights(self, who: str) -> Tensor:
        """``[B, H, N]`` fp32: the layer's attention weight of the probe row on each visual key, under
        the softmax over its whole causal row, ``exp(scale * q_h . k_{h,j} - query_lse_h)`` (query head
        ``h`` reads key head ``h // G``); from the probe alone, no attention matrix. ``who`` names the
        caller in the error when the runner did not fill ``query_lse``."""
        if self.query_lse is None:
            raise ValueError(f"{who} needs LlmProbe.query_lse (the probe row's log-sum-exp over its causal row): "
                             "list ProbeField.QUERY_LSE in its probe_fields and run it with the LLaVA or Qwen runners.")
        q, k = self.query.float(), self.keys.float()
        b, heads, d = q.shape
        kv_heads = k.shape[1]
        scale = self.scale if self.scale is not None else d**-0.5
        logits = torch.einsum("bkgd,bknd->bkgn", q.view(b, kv_heads, heads // kv_heads, d), k).flatten(1, 2)
        return torch.exp(logits * scale - self.query_lse.float()[..., None])

    def text_row_weights(self, who: str) -> Tensor:
        """``[B, H, T, N]`` fp32: the layer's attention weight of each prompt-tail row on each visual
        key under the softmax over that row's whole causal row (``text_queries`` / ``text_lse``; query
        head ``h`` reads key head ``h // G``); padding rows and slots mean nothing. ``text_weights``
        where the runner filled it."""
        if self.text_weights is not None:
            return self.text_weights
        if self.text_queries is None or self.text_lse is None:
            raise ValueError(f"{who} needs LlmProbe.text_queries and text_lse (the prompt tail's queries and "
                             "log-sum-exps): list ProbeField.TEXT_ROWS in its probe_fields and run it with the LLaVA "
                             "or Qwen runners.")
        q, k = self.text_queries.float(), self.keys.float()
        b, heads, t, d = q.shape
        kv_heads = k.shape[1]
        scale = self.scale if self.scale is not None else d**-0.5
        logits = torch.einsum("bkgtd,bknd->bkgtn", q.view(b, kv_heads, heads // kv_heads, t, d), k).flatten(1, 2)
        return torch.exp(logits * scale - self.text_lse.float()[..., None])

    @property
    def text_valid(self) -> Tensor:
        """``[B, T]`` bool: the prompt-tail slots that hold a token (needs ``text_counts``)."""
        if self.text_keys is None or self.text_counts is None:
            raise ValueError("This LlmProbe carries no prompt tail (text_keys / text_counts are None).")
        t = self.text_keys.shape[2]
        return torch.arange(t, device=self.text_counts.device)[None] < self.text_counts[:, None]


class LlmStage(TowerHook):
    """A hook on the language model: cuts of the visual tokens after decoder layers.

    Implementations set ``layer`` (the decoder layer, 0-based, whose attention inputs are scored
    and after which the cut happens) and ``vision_stage`` (a vision-tower hook run before this
    stage, e.g. a first vision-side cut, or None) and implement :meth:`keep`. The runner owns
    positions, masks and the KV-cache split; a stage only chooses.

    Several cuts: a stage overrides :meth:`cuts` (strictly increasing layers, the first is
    ``layer``) and :meth:`keep_stage`; cut ``i`` sees the tokens kept by cut ``i - 1`` (``counts``
    of its probe) and keeps a subset of them. ``score_next`` picks where a cut after layer ``k``
    reads its attention inputs: False, layer ``k``'s own (its input norm, query projection and its
    cached keys and values); True, layer ``k + 1``'s, applied to layer ``k``'s output (the next
    layer's input norm, query/key/value projections and RoPE at the current positions, keys and
    values re-projected), i.e. the attention the first layer after the cut would compute on the
    uncut sequence.
    """

    towers = (Tower.LLM,)
    #: whether LLaVA-NeXT's packing keeps its ``image_newline`` tokens when this stage runs; kept
    #: newlines are layout: never scored, never cut, outside the budget.
    anyres_newlines: bool = True
    #: whether a cut after layer k scores with layer k + 1's projections of layer k's output
    #: (class docstring); False: with layer k's own attention inputs.
    score_next: bool = False
    #: the optional probe fields this stage reads (:class:`ProbeField`); the runner computes only
    #: these. Default: all of them (correct for any stage; a stage that lists fewer is cheaper).
    probe_fields: frozenset[ProbeField] = ALL_PROBE_FIELDS

    def cuts(self) -> tuple[int, ...]:
        """The decoder layers (0-based, strictly increasing) after which the visual tokens are cut;
        one cut, ``(layer,)``, unless a stage overrides it."""
        return (int(self.layer),)

    def keep(self, probe: LlmProbe) -> Tensor:
        """``[B, N]`` bool: the visual slots of ``probe`` to keep (padding slots are ignored)."""
        raise TypeError(f"{type(self).__name__} is an LlmStage but does not implement keep(probe).")

    def keep_stage(self, probe: LlmProbe, stage: int) -> Tensor:
        """``[B, N]`` bool: the visual slots to keep at cut ``stage`` (0-based index into
        :meth:`cuts`); the runner calls this. A one-cut stage's is :meth:`keep`."""
        if stage != 0:
            raise TypeError(f"{type(self).__name__} declares {len(self.cuts())} cuts but does not implement keep_stage(probe, stage).")
        return self.keep(probe)

    def merge_stage(self, probe: LlmProbe, stage: int, keep: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Tokens to insert after cut ``stage``, given its ``keep [B, N]``: None (the default) for none,
        or ``(weights [B, M, N], counts [B])``: sample ``b`` gets ``counts[b]`` new tokens whose hidden
        states are ``weights[b, m] @ states[b]`` (the layer's output states at the visual slots,
        ``LlmProbe.states``; weights on padding slots are ignored), in order ``m``. The runner inserts
        them right after the sample's last visual token (layout ones included) of the uncut sequence,
        counts them as scored visual tokens for later cuts, and positions them by its policy
        (``compact``: renumbered with the rest; ``original``: the positions of the token they follow).
        A stage that merges lists :attr:`ProbeField.STATES` in ``probe_fields``."""
        return None


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
