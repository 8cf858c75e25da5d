"""The LLM side of the LLaVA and Qwen runners: the assembled inputs, and a Hugging Face decoder run
layer by layer with an LLM-stage token cut (:class:`~vlm.llm_stage.LlmStage`).

:class:`CutDecoder` drives a ``LlamaModel``-like decoder (``layers``, ``rotary_emb``, ``norm``; Llama,
Qwen2.5-VL's and Qwen3-VL's text models) with the model's own modules, so its attention
implementation (sdpa, eager, flash) is untouched:

* layers ``0..k`` (``k = pruner.layer``, the first of ``pruner.cuts()``) run on the assembled
  sequence and always fill a KV cache (the caller's, or a scratch one). The pruner scores with layer ``k``'s own post-RoPE keys and
  values from that cache, and the probe row's query (each sample's last prompt token) re-projected
  from the layer's input as the layer's attention computes it (``input_layernorm``, ``q_proj``, the
  per-head or full-width ``q_norm`` where the attention has one, as Qwen3's does, and the RoPE
  tables of the probe token's own position, 3-D under M-RoPE): one query row per sample, no
  attention matrix and no recomputed keys; then it picks the visual tokens kept. The probe also
  carries the probe row's per-head log-sum-exp over its whole causal row (the layer's softmax
  normaliser), the layer's output states of the visual tokens (raw and final-normed), the keys,
  states, queries and per-row log-sum-exps of the prompt tail after the last visual token, and the
  input embeddings of the visual tokens before the first cut and of the prompt tail (``LlmProbe``'s
  optional fields: only the groups the stage lists in ``LlmStage.probe_fields`` are computed);
* after layer ``k`` each sample keeps its text tokens, its layout tokens (``LlmInputs.layout_mask``,
  e.g. kept ``image_newline``: never scored, outside the budget) and the kept visual tokens, in order,
  re-padded on the input's padding side; layers ``k+1..`` run on that shorter sequence.

Masks: transformers' ``create_causal_mask`` per layer group, from the group's 2-D padding mask, with
the ``layer_idx`` of the group's first layer so that the group's KV cache sizes it.
Positions: ``[B, L]``, or ``[A, B, L]`` for multi-axis RoPE (Qwen's M-RoPE: ``A = 3`` axes, temporal,
height, width, as transformers' ``position_ids`` with the axes first). Layers ``0..k`` use the
assembled sequence's position ids. After the cut the ``compact`` policy renumbers each sample
0..L'-1 (on every axis; the released LLM-stage pruners' choice), ``original`` keeps every kept
token's own ids (all axes). RoPE tables come from ``lm.rotary_emb`` per group. The decoder layers get
``position_ids`` only when it is ``[B, L]``: with M-RoPE transformers hands them None (the tables
carry the positions), which keeps FlashAttention from reading 3-D ids as packing.
Per-layer additions (``LlmInputs.deepstack``, Qwen3-VL's DeepStack): after decoder layer ``i < n`` the
hidden states get ``deepstack[i]`` (zeros except at the visual tokens, so the add gives the values of
transformers' masked add); layers ``<= k`` on the assembled sequence, layers ``> k`` on the cut one, where
only the kept visual tokens carry features.
KV cache: one ``DynamicCache``; layers ``0..k`` hold the full-length keys/values with the original
positions, layers ``> k`` the cut ones with the group's positions, so per-layer cache lengths
differ. Each decoding step appends one token to every group: its mask grows by one and the new
token takes the position after the group's last one (:meth:`LayerGroup.next_token`; under M-RoPE the
largest position over the axes plus one on every axis, i.e. transformers' ``rope_deltas``).

Several cuts (``pruner.cuts()``, strictly increasing ``k_0 < k_1 < ...``): the above repeats per
cut: layers ``k_{i-1}+1..k_i`` run on the sequence left by cut ``i - 1`` (its positions, mask and
DeepStack rows) and fill the cache, cut ``i`` scores its survivors (``pruner.keep_stage(probe, i)``;
``LlmProbe.initial_counts`` carries the counts before the first cut) and keeps a subset, re-padded;
the layers after the last cut run on the final sequence. One layer group per cut plus one after
the last: each holds its own cache length and positions, and decoding appends to every group.
``LlmCut.index`` maps the final rows to the assembled sequence (-1: padding, or a merged row).
A cut may also insert merged tokens (``LlmStage.merge_stage``: weights over the visual slots of the
layer's output states): they go right after the sample's last visual token (layout included) of
the uncut sequence, count as scored visual tokens for later cuts, take the positions of that token
under ``original`` (renumbered with the rest under ``compact``) and zero DeepStack rows. With ``pruner.score_next`` a cut
after layer ``k`` scores with layer ``k + 1``'s input norm, query/key/value projections (and
``q_norm`` / ``k_norm``) and RoPE applied to layer ``k``'s output at the group's positions: the
keys and values are re-projected (:meth:`CutDecoder.project_kv`), not read from the cache.

Packed (``packed=True``, ``vlm.towers.packed_prefill``): layers ``0..k`` run on the batch packed
into one row and layers ``k+1..`` on the packed cut sequence (each group between cuts packed
anew), all with the varlen attention; the
probe, the cut and the decoding steps see the same padded tensors as above (unpacked, zeros on
padding; the cache re-padded per layer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from vlm.hooks import TowerHook
from vlm.llm_stage import ALL_PROBE_FIELDS, LlmProbe, LlmStage, ProbeField, StageHooks, split_stages
from vlm.tokens import kept_first
from vlm.towers.packed_prefill import PackedLayout, layer_position_ids, repad_cache, run_packed, scratch_cache


@dataclass
class LayerGroup:
    """Consecutive decoder ``layers`` that hold the same tokens: ``attention_mask [B, K]`` (1 = token)
    over every token they hold (cached and current), ``position_ids [B, Q]`` (or ``[A, B, Q]``, M-RoPE)
    of the current ones."""

    layers: range
    attention_mask: Tensor
    position_ids: Tensor

    def next_token(self) -> "LayerGroup":
        """The group for one appended token per sample: the mask grows by a valid column, and the
        token's position follows the sample's last valid one (either padding side). M-RoPE
        ``[A, B, Q]``: the token takes, on every axis, one more than the largest position of the
        sample's current tokens over all axes (transformers' ``rope_deltas``: text resumes after the
        largest vision position)."""
        mask = self.attention_mask
        pos = self.position_ids
        current = mask[:, -pos.shape[-1] :].bool()
        if pos.dim() == 2:
            nxt = pos.masked_fill(~current, -1).amax(1, keepdim=True) + 1
        else:
            last = pos.masked_fill(~current[None], -1).amax(dim=(0, 2))
            nxt = (last + 1).view(1, -1, 1).expand(pos.shape[0], -1, 1).contiguous()
        return LayerGroup(self.layers, torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1), nxt)


@dataclass
class LlmCut:
    """The sequence after an LLM-stage cut after decoder layer ``layer`` (the first of ``layers``, all
    the cut layers): ``index [B, L']`` (the row of the assembled sequence each row came from; -1 for
    padding and for merged rows a cut inserted), ``attention_mask [B, L']``, ``position_ids [B, L']`` (``[A, B, L']`` under M-RoPE) of
    the final sequence, ``visual_counts [B]`` (visual tokens kept per sample after the last cut;
    ``stage_visual_counts[i]`` after cut ``i``), and the layer groups (one before each cut, one
    after the last) at the end of the prefill, from which decoding continues."""

    layer: int
    index: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    visual_counts: Tensor
    groups: list[LayerGroup]
    layers: tuple[int, ...] = ()
    stage_visual_counts: Optional[list[Tensor]] = None


@dataclass
class LlmInputs:
    """``embeds [B, L, D]``, ``attention_mask [B, L]`` (1 = token), ``position_ids [B, L]`` (or
    ``[A, B, L]``, multi-axis RoPE, axes first: Qwen's M-RoPE), ``visual_counts [B]`` (visual
    tokens each sample carries), ``visual_mask [B, L]`` (the visual tokens), ``probe_index [B]``
    (each sample's last prompt token: the query an LLM-stage pruner scores with), ``cut``: set
    when an LLM-stage pruner cut the sequence (the runner's logits then follow ``cut``'s layout,
    not this one), ``layout_mask [B, L]`` (or None for none): the
    visual tokens that mark layout (LLaVA-NeXT's ``image_newline``), which the cut keeps like text
    and does not score or count against its budget; ``deepstack [n, B, L, D]`` (or None): added to the
    hidden states after decoder layer ``i < n`` (Qwen3-VL's DeepStack features, zeros except at the
    visual tokens)."""

    embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    visual_counts: Tensor
    visual_mask: Tensor
    probe_index: Tensor
    cut: Optional[LlmCut] = None
    layout_mask: Optional[Tensor] = None
    deepstack: Optional[Tensor] = None


def llm_stage(hooks: Union[Iterable[TowerHook], StageHooks, None]) -> Optional[LlmStage]:
    """The LLM stage among ``hooks`` (at most one), or None (vlm.llm_stage.split_stages)."""
    return split_stages(hooks).llm


def vision_hooks(hooks: Union[Iterable[TowerHook], StageHooks, None]) -> list[TowerHook]:
    """``hooks`` with the LLM stage replaced by its vision stage (if any), in order."""
    return list(split_stages(hooks).hooks)


def rows(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, L, ...]`` gathered along dim 1 at ``index [B, M]`` (advanced indexing: it copies whole
    rows, several times faster on CPU than ``torch.gather`` with an expanded index)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def zero_at(x: Tensor, pad: Optional[Tensor]) -> Tensor:
    """``x`` with zeros where ``pad`` (broadcast) is True; ``x`` itself when ``pad`` is None (no
    padding: a batch of equal counts skips the copy)."""
    return x if pad is None else x.masked_fill(pad, 0.0)


def heads_at(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, H, L, d]`` (per-head keys or values) gathered along dim 2 at ``index [B, M]``."""
    return rows(x.transpose(1, 2), index).transpose(1, 2)


def gather_positions(positions: Tensor, index: Tensor) -> Tensor:
    """``positions [B, L]`` or ``[A, B, L]`` (M-RoPE) gathered along the sequence at ``index [B, M]``."""
    if positions.dim() == 2:
        return torch.gather(positions, 1, index)
    return torch.gather(positions, 2, index[None].expand(positions.shape[0], -1, -1))


def repack(keep: Tensor, side: str, key: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The rows ``keep [B, L]`` marks, in order (ascending ``key [B, L]`` where given), padded on
    ``side`` to the batch maximum L'. Returns ``index [B, L']`` (source row), ``valid [B, L']``
    (False on padding) and ``rank [B, L']`` (0-based place of the row among its sample's kept rows);
    index and rank mean nothing on padding."""
    counts = keep.sum(1)
    width = int(counts.max())
    if key is None:
        order = kept_first(keep, width)
    else:
        top = key.max() + 1
        order = torch.sort(torch.where(keep, key, key + top), dim=1, stable=True).indices[:, :width]
    rank = torch.arange(width, device=keep.device)[None].expand(keep.shape[0], width)
    if side == "left":
        rank = rank - (width - counts)[:, None]
    valid = (rank >= 0) & (rank < counts[:, None])
    rank = rank.clamp(min=0)
    return torch.gather(order, 1, rank), valid, rank


class CutDecoder:
    """A transformers decoder with one LLM-stage pruner, cutting after each of its layers
    (``pruner.cuts()``; module docstring). Owns no parameters."""

    def __init__(self, lm: nn.Module, pruner: LlmStage, position_policy: str = "compact", packed: bool = False) -> None:
        n = int(lm.config.num_hidden_layers)
        cuts = tuple(int(k) for k in pruner.cuts())
        last = n - 2
        if len(cuts) == 1 and not 0 <= cuts[0] <= last:
            raise ValueError(
                f"{type(pruner).__name__}: layer {cuts[0]} is out of range for a language model with {n} decoder "
                f"layers: the cut runs after layer `layer` and needs a layer after it, so set layer to 0..{last}."
            )
        if not cuts or any(not 0 <= k <= last for k in cuts) or any(a >= b for a, b in zip(cuts, cuts[1:])):
            raise ValueError(
                f"{type(pruner).__name__}: cut layers {list(cuts)} are out of range for a language model with {n} "
                f"decoder layers: each cut runs after its layer and needs a layer after it, so use strictly increasing "
                f"layers in 0..{last}."
            )
        layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types):
            raise TypeError("An LLM-stage cut needs full-attention layers only (no sliding-window or linear layers); use a vision-tower pruner on this model.")
        self.score_next = bool(getattr(pruner, "score_next", False))
        self.cuts = cuts
        #: the decoder layer whose attention inputs each cut scores with
        self.score_layers = tuple(k + 1 if self.score_next else k for k in cuts)
        attn = lm.layers[self.score_layers[0]].self_attn
        self.q_norm_per_head = self.query_norm_layout(attn)
        self.lm = lm
        self.pruner = pruner
        self.position_policy = position_policy
        self.packed = packed
        self.apply_rope: Callable = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb

    @staticmethod
    def query_norm_layout(attn: nn.Module) -> Optional[bool]:
        """How ``attn`` normalises its queries before RoPE: None (no ``q_norm``), True (per head, on
        ``[..., H, d]``, as Qwen3 does) or False (on the full ``H * d`` projection, as OLMo2 does)."""
        norm = getattr(attn, "q_norm", None)
        if norm is None:
            return None
        weight = getattr(norm, "weight", None)
        width = attn.q_proj.out_features
        if weight is None or weight.numel() not in (attn.head_dim, width):
            raise TypeError(
                f"{type(attn).__name__}.q_norm has no weight of the head size ({attn.head_dim}) or of the query "
                f"projection ({width}); the probe query re-projection cannot tell how it normalises."
            )
        return weight.numel() == attn.head_dim

    # --- layers -------------------------------------------------------------------------------
    def context(self, group: LayerGroup, h: Tensor, cache) -> tuple[Optional[Tensor], tuple[Tensor, Tensor]]:
        """The group's attention mask (in the attention implementation's format) and RoPE tables."""
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=self.lm.config, inputs_embeds=h, attention_mask=group.attention_mask, cache=cache,
            position_ids=layer_position_ids(group.position_ids), layer_idx=group.layers.start,
        )
        return mask, self.lm.rotary_emb(h, position_ids=group.position_ids)

    def run(
        self, layers: range, h: Tensor, mask, rope: tuple[Tensor, Tensor], position_ids: Tensor, cache,
        adds: Optional[Tensor] = None,
    ) -> Tensor:
        """Decoder ``layers`` over ``h``; after layer ``i`` the hidden states get ``adds[i]`` where
        ``i < len(adds)`` (DeepStack; module docstring)."""
        ids = layer_position_ids(position_ids)
        for i in layers:
            h = self.lm.layers[i](h, attention_mask=mask, position_ids=ids, cache=cache,
                                  use_cache=cache is not None, position_embeddings=rope)
            if adds is not None and i < adds.shape[0]:
                h = h + adds[i].to(h.dtype)
        return h

    # --- the probe ----------------------------------------------------------------------------
    def probe(
        self, h: Tensor, rope: tuple[Tensor, Tensor], keys: Tensor, values: Optional[Tensor], visual: Tensor,
        probe_index: Tensor, out: Optional[Tensor] = None, valid: Optional[Tensor] = None,
        layout: Optional[Tensor] = None, layer: Optional[int] = None, embeds: Optional[Tensor] = None,
        fields: frozenset[ProbeField] = ALL_PROBE_FIELDS,
    ) -> tuple[LlmProbe, Tensor]:
        """The pruner's view of layer ``k``: the probe row's query, re-projected from the layer's input
        ``h [B, L, D]`` (its input norm, ``q_proj``, ``q_norm`` if any, and RoPE from ``rope``, the
        tables of the whole sequence: one row per sample), and the layer's own post-RoPE ``keys`` /
        ``values [B, Hkv, L, d]`` (from its KV cache; ``values`` None: the probe carries none) at the
        probe row and the scored tokens ``visual``. With ``out`` (the layer's output ``[B, L, D]``),
        ``valid [B, L]`` (the tokens) and ``layout`` (every visual token, layout ones included; default
        ``visual``) it also fills the optional groups of ``fields`` (:class:`~vlm.llm_stage.ProbeField`):
        the probe row's per-head log-sum-exp over its causal row, the (final-normed) output states of
        the visual tokens, the keys and normed states of the prompt tail, the prompt-tail rows' queries
        and per-row log-sum-exps, and (given ``embeds``, the input embeddings ``[B, L, D]`` of the
        current rows) the prompt tail's embeddings. ``layer``: the decoder layer whose projections make
        the query (default: the first cut's scoring layer). Returns the probe and ``visual_index [B, N]``
        (sequence row of each visual slot)."""
        layer = self.lm.layers[self.score_layers[0] if layer is None else layer]
        attn = layer.self_attn
        b, d = h.shape[0], attn.head_dim
        heads = attn.q_proj.out_features // d
        counts = visual.sum(1)
        visual_index = kept_first(visual, int(counts.max()))
        q = self.queries(layer, h, rope, probe_index[:, None])
        probe = LlmProbe(q[:, :, 0], None if values is None else heads_at(values, probe_index[:, None])[:, :, 0],
                         heads_at(keys, visual_index), None if values is None else heads_at(values, visual_index),
                         counts)  # fmt: skip
        probe.scale = float(getattr(attn, "scaling", d**-0.5))
        if out is None or valid is None:
            return probe, visual_index
        length, kv_heads = keys.shape[2], keys.shape[1]
        seq = torch.arange(length, device=keys.device)[None]
        causal = valid.bool() & (seq <= probe_index[:, None])  # the probe row's keys
        if ProbeField.QUERY_LSE in fields:
            logits = torch.einsum("bkgd,bkld->bkgl", q[:, :, 0].float().view(b, kv_heads, heads // kv_heads, d),
                                  keys.float()).flatten(1, 2) * probe.scale
            probe.query_lse = logits.masked_fill(~causal[:, None], float("-inf")).logsumexp(-1)
        slot_pad = None if bool((counts == counts.max()).all()) else ~probe.valid[..., None]  # padding slots
        if ProbeField.STATES in fields or ProbeField.HIDDEN in fields:
            states = rows(out, visual_index)
            if ProbeField.STATES in fields:
                probe.states = zero_at(states, slot_pad)
            if ProbeField.HIDDEN in fields:  # the final norm is per token: normed rows = rows of the normed
                probe.hidden = zero_at(self.lm.norm(states), slot_pad)
        if not fields & {ProbeField.TEXT, ProbeField.TEXT_ROWS, ProbeField.EMBEDS}:
            return probe, visual_index
        marked = visual if layout is None else layout
        last = torch.where(marked, seq, -1).max(1).values  # the last visual token (-1: none)
        tail = causal & ~marked & (seq > last[:, None])
        text_counts = tail.sum(1)
        tail_index = kept_first(tail, int(text_counts.max()))
        text_valid = torch.arange(tail_index.shape[1], device=keys.device)[None] < text_counts[:, None]
        text_pad = None if bool(text_valid.all()) else ~text_valid  # padding rows of the tail
        probe.text_counts = text_counts
        if ProbeField.TEXT in fields:
            probe.text_keys = zero_at(heads_at(keys, tail_index), None if text_pad is None else text_pad[:, None, :, None])
            probe.text_hidden = zero_at(self.lm.norm(rows(out, tail_index)), None if text_pad is None else text_pad[..., None])
        if ProbeField.TEXT_ROWS in fields:
            tq = self.queries(layer, h, rope, tail_index)  # [B, H, T, d]
            t_logits = torch.einsum("bkgtd,bkld->bkgtl", tq.float().view(b, kv_heads, heads // kv_heads, -1, d),
                                    keys.float()).flatten(1, 2) * probe.scale
            row_causal = valid.bool()[:, None] & (seq[:, None] <= tail_index[:, :, None])  # [B, T, L]
            probe.text_queries = zero_at(tq, None if text_pad is None else text_pad[:, None, :, None])
            probe.text_lse = t_logits.masked_fill(~row_causal[:, None], float("-inf")).logsumexp(-1).masked_fill(
                ~text_valid[:, None], 0.0)
            at_visual = visual_index[:, None, None, :].expand(-1, t_logits.shape[1], t_logits.shape[2], -1)
            probe.text_weights = (t_logits.gather(-1, at_visual) - probe.text_lse[..., None]).exp()
        if ProbeField.EMBEDS in fields and embeds is not None:
            probe.text_embeds = zero_at(rows(embeds, tail_index), None if text_pad is None else text_pad[..., None])
        return probe, visual_index

    def queries(self, layer: nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], index: Tensor) -> Tensor:
        """Post-RoPE queries ``[B, H, M, d]`` of ``layer``'s attention at the rows ``index [B, M]`` of its
        input ``h [B, L, D]`` (input norm, ``q_proj``, ``q_norm`` if any, RoPE from ``rope``)."""
        attn = layer.self_attn
        b, m, d = h.shape[0], index.shape[1], attn.head_dim
        heads = attn.q_proj.out_features // d
        x = layer.input_layernorm(rows(h, index))
        cos, sin = (rows(t, index) for t in rope)
        q = attn.q_proj(x)
        if self.q_norm_per_head is False:
            q = attn.q_norm(q)
        q = q.view(b, m, heads, d)
        if self.q_norm_per_head:
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        return self.apply_rope(q, q[:, :1], cos, sin)[0]  # RoPE on the queries once (the second operand is a dummy)

    def project_kv(
        self, layer: int, h: Tensor, rope: tuple[Tensor, Tensor], values: bool = True
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Decoder ``layer``'s post-RoPE keys and values ``[B, Hkv, L, d]`` of its input ``h [B, L, D]``,
        re-projected as its attention computes them (input norm, ``k_proj`` / ``v_proj``, ``k_norm`` if
        any, RoPE from ``rope``): what a ``score_next`` cut scores with (no cache holds them). Without
        ``values`` the values are None (``v_proj`` is not run)."""
        block = self.lm.layers[layer]
        attn = block.self_attn
        b, length, d = h.shape[0], h.shape[1], attn.head_dim
        x = block.input_layernorm(h)
        k = attn.k_proj(x)
        v = attn.v_proj(x) if values else None
        norm = getattr(attn, "k_norm", None)
        per_head = None if norm is None else getattr(norm, "weight", torch.empty(d)).numel() == d
        if per_head is False:
            k = norm(k)
        k = k.view(b, length, -1, d)
        if per_head:
            k = norm(k)
        k = k.transpose(1, 2)
        k = self.apply_rope(k, k[:, :1], *rope)[0]  # RoPE on the keys once (the second operand is a dummy)
        return k, None if v is None else v.view(b, length, -1, d).transpose(1, 2)

    # --- prefill and decoding -----------------------------------------------------------------
    def prefill(self, inputs: LlmInputs, padding_side: str, cache=None) -> tuple[Tensor, LlmCut]:
        """Final-norm hidden states ``[B, L', D]`` of the cut sequence, and its layout.

        Cut ``i`` (after layer ``cuts[i]``) runs the layers since the previous cut on the current
        sequence (always filling a cache: the caller's, or a scratch one), scores with the probe of
        its scoring layer, and keeps the text, layout and kept visual tokens in order, re-padded on
        ``padding_side``; the layers after the last cut run on the final sequence."""
        n_layers = len(self.lm.layers)
        valid, visual = inputs.attention_mask.bool(), inputs.visual_mask & inputs.attention_mask.bool()
        scored = visual if inputs.layout_mask is None else visual & ~inputs.layout_mask
        probe_index = inputs.probe_index
        if bool(visual.gather(1, probe_index[:, None]).any()):
            raise ValueError("The LLM-stage cut scores with each sample's last prompt token; it must be text, not an image token.")
        h, mask2d, positions, adds = inputs.embeds, inputs.attention_mask, inputs.position_ids, inputs.deepstack
        source = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)  # assembled row of each row
        initial = scored.sum(1)
        embeds0 = inputs.embeds
        fields = self.pruner.probe_fields
        with_embeds, with_values = ProbeField.EMBEDS in fields, ProbeField.VALUES in fields
        visual_embeds = None
        if with_embeds:
            visual_embeds = rows(embeds0, kept_first(scored, int(initial.max()))).masked_fill(
                ~(torch.arange(int(initial.max()), device=h.device)[None] < initial[:, None])[..., None], 0.0)
        multi = positions.dim() == 3
        work = cache if cache is not None else scratch_cache(self.lm)  # the scores' keys and values
        groups: list[LayerGroup] = []
        counts: list[Tensor] = []
        start = 0
        for stage, (k, score_layer) in enumerate(zip(self.cuts, self.score_layers)):
            group = LayerGroup(range(start, k + 1), mask2d.to(inputs.attention_mask.dtype), positions)
            if self.packed:
                h_in, h, rope, keys, values = self.group_packed(group, h, cache, adds)
            else:
                mask, rope = self.context(group, h, work)
                h_in = self.run(range(start, k), h, mask, rope, positions, work, adds)
                h = self.run(range(k, k + 1), h_in, mask, rope, positions, work, adds)
                keys, values = work.layers[k].keys, work.layers[k].values
            if self.score_next:  # the next layer's attention inputs, from this layer's output
                h_in = h
                keys, values = self.project_kv(score_layer, h, rope, values=with_values)
            probe, visual_index = self.probe(
                h_in, rope, keys, values if with_values else None, scored, probe_index, h, valid, visual,
                layer=score_layer, embeds=rows(embeds0, source.clamp(min=0)) if with_embeds else None, fields=fields)
            probe.initial_counts = initial
            probe.embeds = visual_embeds
            length = h.shape[1]
            slot = torch.where(probe.valid, visual_index, length)  # padding slots land on a dropped column
            keep = torch.cat([valid & ~scored, valid.new_zeros(valid.shape[0], 1)], 1)
            chosen = self.pruner.keep_stage(probe, stage) & probe.valid
            keep = keep.scatter(1, slot, chosen)[:, :length]
            merge = self.pruner.merge_stage(probe, stage, chosen)
            key = None
            if merge is not None and int(merge[1].max()) > 0:  # insert merged tokens after the visual block
                if probe.states is None:
                    raise TypeError(f"{type(self.pruner).__name__}.merge_stage returned merged tokens, but its "
                                    "probe_fields lacks ProbeField.STATES (the states they average): add it.")
                weights, merged_counts = merge
                m = weights.shape[1]
                mvalid = torch.arange(m, device=h.device)[None] < merged_counts[:, None]
                states = probe.states.float().masked_fill(~probe.valid[..., None], 0.0)
                merged = torch.einsum("bmn,bnd->bmd", weights.float(), states).to(h.dtype)
                seq = torch.arange(length, device=h.device)[None]
                anchor = torch.where(visual, seq, -1).max(1).values.clamp(min=0)  # the last visual token
                key = torch.cat([seq.expand(h.shape[0], -1) * (m + 1),
                                 anchor[:, None] * (m + 1) + 1 + torch.arange(m, device=h.device)[None]], 1)
                keep, h = torch.cat([keep, mvalid], 1), torch.cat([h, merged], 1)
                at_anchor = anchor[:, None].expand(-1, m)
                positions = torch.cat([positions, gather_positions(positions, at_anchor)], -1)
                if adds is not None:
                    adds = torch.cat([adds, adds.new_zeros(*adds.shape[:2], m, adds.shape[3])], 2)
                source = torch.cat([source, source.new_full((h.shape[0], m), -1)], 1)
                visual, scored = torch.cat([visual, mvalid], 1), torch.cat([scored, mvalid], 1)
            index, kept, rank = repack(keep, padding_side, key)
            h = rows(h, index).masked_fill(~kept[..., None], 0.0)
            if self.position_policy == "original":
                positions = gather_positions(positions, index)
            else:
                positions = rank.expand(positions.shape[0], -1, -1) if multi else rank
            # pads at 1, as transformers does for 1-D ids; at 0 under M-RoPE, as get_rope_index leaves them
            positions = positions.masked_fill(~kept, 0 if multi else 1)
            if adds is not None:  # DeepStack after the cut
                adds = None if adds.shape[0] <= k + 1 else torch.stack([rows(a, index) for a in adds]).masked_fill(
                    ~kept[None, ..., None], 0.0)
            source = torch.gather(source, 1, index)
            valid, visual, scored = kept, rows(visual, index) & kept, rows(scored, index) & kept
            probe_index = (kept & (source == inputs.probe_index[:, None])).int().argmax(1)  # text: always kept
            mask2d = kept
            counts.append((visual & kept).sum(1))
            groups.append(group)
            start = k + 1
        after = LayerGroup(range(start, n_layers), valid.to(inputs.attention_mask.dtype), positions)
        if self.packed:
            h = self.late_packed(after, h, cache, adds)
        else:
            mask, rope = self.context(after, h, cache)
            h = self.run(after.layers, h, mask, rope, positions, cache, adds)
        cut = LlmCut(
            layer=self.cuts[0], index=source.masked_fill(~valid, -1), attention_mask=after.attention_mask,
            position_ids=positions, visual_counts=counts[-1], groups=[*groups, after], layers=self.cuts,
            stage_visual_counts=counts,
        )
        return self.lm.norm(h), cut

    # --- packed prefill (vlm.towers.packed_prefill) -------------------------------------------
    def group_packed(
        self, group: LayerGroup, h: Tensor, cache, adds: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], Tensor, Tensor]:
        """The layers of ``group`` (up to and including a cut layer ``k``) over the packed sequence
        ``h [B, L, D]``. Returns, padded again: layer ``k``'s input and output, the RoPE tables, and
        layer ``k``'s keys and values (what the probe reads); ``cache`` (if given) gets the group's
        layers re-padded."""
        start, k = group.layers.start, group.layers.stop - 1
        layout = PackedLayout.from_mask(group.attention_mask)
        x, positions = layout.pack(h), layout.pack_positions(group.position_ids)
        packed_adds = None if adds is None else layout.pack_stack(adds[: k + 1])
        scratch = scratch_cache(self.lm)  # layer k's keys and values are the scores' inputs
        h_in = run_packed(self.lm, range(start, k), x, layout, positions, scratch, packed_adds)
        h = run_packed(self.lm, range(k, k + 1), h_in, layout, positions, scratch, packed_adds)
        if cache is not None:
            repad_cache(scratch, cache, layout, group.layers)
        rope = tuple(layout.unpack(t) for t in self.lm.rotary_emb(x, position_ids=positions))
        kv = scratch.layers[k]
        return layout.unpack(h_in), layout.unpack(h), rope, layout.unpack_heads(kv.keys), layout.unpack_heads(kv.values)

    def late_packed(self, after: LayerGroup, h: Tensor, cache, adds: Optional[Tensor] = None) -> Tensor:
        """The layers after the cut over the packed cut sequence ``h [B, L', D]`` (padded on input
        and output; ``adds [n, B, L', D]`` the per-layer additions of the cut sequence, or None);
        ``cache`` (if given) gets them re-padded."""
        layout = PackedLayout.from_mask(after.attention_mask)
        scratch = None if cache is None else scratch_cache(self.lm)
        packed_adds = None if adds is None else layout.pack_stack(adds)
        out = run_packed(self.lm, after.layers, layout.pack(h), layout, layout.pack_positions(after.position_ids),
                         scratch, packed_adds)
        if cache is not None:
            repad_cache(scratch, cache, layout, after.layers)
        return layout.unpack(out)

    def decode(self, embeds: Tensor, groups: list[LayerGroup], cache) -> Tensor:
        """Final-norm hidden states of the new tokens ``embeds [B, Q, D]``, with each group's mask
        and positions already advanced to them (:meth:`LayerGroup.next_token`)."""
        h = embeds
        for group in groups:
            mask, rope = self.context(group, h, cache)
            h = self.run(group.layers, h, mask, rope, group.position_ids, cache)
        return self.lm.norm(h)
