"""Packed LLM prefill: the batch's samples end to end in one row, attention as packed varlen.

Why: a padded prefill runs every decoder layer on ``B x L_max`` rows and attends ``B x L_max^2``
pairs, while a batch of LLaVA prompts is ragged: prompts differ in length, anyres images differ in
token count, and a pruner may keep a different number of tokens per image. Packed, the layers run
on the ``sum(L_i)`` real tokens only and attention covers ``sum(L_i^2)`` pairs (half of it, causal).

How (FlashAttention's packing, as transformers' ``DataCollatorWithFlattening`` uses it):

* :class:`PackedLayout` maps the padded ``[B, L]`` batch to one row of ``T = sum(L_i)`` tokens and
  back; ``cu_seqlens [B+1]`` marks the samples. Position ids restart per sample (they are the
  padded batch's own, so either position policy carries over unchanged).
* the Hugging Face decoder runs that ``[1, T]`` row with its own modules and FlashAttention's
  keyword arguments (``cu_seq_lens_q/k``, ``max_length_q/k``), which its layers pass to the
  attention function. For the call, the decoder's attention implementation is ``vlm_varlen``
  (:func:`varlen_attention_forward`, registered in transformers' ``AttentionInterface``; the
  previous implementation is restored after, also on error): ``vlm.kernels.attention`` with
  ``AttnSpec(causal=True, cu_seqlens_q, cu_seqlens_k)``, i.e. the fused Triton varlen kernel on
  CUDA, and one fused call per sample where that kernel does not apply (CPU, other head dims).
  transformers builds no mask for an implementation it has no mask function for.
* the final-norm hidden states are scattered back to the padded layout (zeros on padding); a KV
  cache filled by the packed run is re-padded per layer (zeros on padding, which the decode steps'
  2-D mask hides) so that decoding continues on the padded batch with the model's own attention.

:func:`packed_prefill` runs the decoder's own forward this way; :func:`run_packed` runs a range of
its layers, for the LLM-stage cut (``vlm.towers.language_model.CutDecoder``), which packs the
layers before its cut and, with a new layout, those after it.

Parity contract (tests): the hidden states at every real token equal the padded prefill's, and
greedy generation gives the same tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from vlm.kernels import AttnSpec, attention

#: The name under which :func:`varlen_attention_forward` is registered in transformers.
ATTN_IMPLEMENTATION = "vlm_varlen"


@dataclass(frozen=True)
class PackedLayout:
    """Where each real token of a padded ``[B, L]`` batch sits in the packed row: ``index [T]``
    (flat ``b * L + l`` of each packed token, samples in batch order), ``cu_seqlens`` int32
    ``[B+1]`` (sample ``b`` is packed rows ``cu[b]:cu[b+1]``) and ``max_len`` (the longest sample)."""

    index: Tensor
    cu_seqlens: Tensor
    max_len: int
    batch: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> "PackedLayout":
        """The layout of the tokens ``attention_mask [B, L]`` marks (1 = token; either padding side)."""
        valid = attention_mask.bool()
        counts = valid.sum(1)
        cu = torch.zeros(valid.shape[0] + 1, dtype=torch.int32, device=valid.device)
        cu[1:] = counts.cumsum(0)
        index = valid.flatten().nonzero().flatten()
        return cls(index, cu, int(counts.max()), valid.shape[0], valid.shape[1])

    def pack(self, x: Tensor) -> Tensor:
        """``x [B, L, ...]`` -> ``[1, T, ...]``."""
        return x.flatten(0, 1)[self.index][None]

    def unpack(self, x: Tensor) -> Tensor:
        """``x [1, T, ...]`` -> ``[B, L, ...]``, zeros on padding."""
        out = x.new_zeros(self.batch * self.length, *x.shape[2:])
        out[self.index] = x[0]
        return out.view(self.batch, self.length, *x.shape[2:])

    def pack_positions(self, positions: Tensor) -> Tensor:
        """Position ids ``[B, L]`` -> ``[1, T]``, or M-RoPE ids ``[A, B, L]`` -> ``[A, 1, T]``."""
        if positions.dim() == 2:
            return self.pack(positions)
        return self.pack(positions.permute(1, 2, 0)).permute(2, 0, 1)

    def pack_stack(self, x: Tensor) -> Tensor:
        """A stack ``x [n, B, L, ...]`` -> ``[n, 1, T, ...]`` (e.g. per-layer DeepStack additions)."""
        if x.shape[0] == 0:
            return x.new_zeros(0, 1, len(self.index), *x.shape[3:])
        return torch.stack([self.pack(t) for t in x])

    def unpack_heads(self, x: Tensor) -> Tensor:
        """A cache tensor ``[1, H, T, d]`` -> ``[B, H, L, d]``, zeros on padding."""
        return self.unpack(x.transpose(1, 2)).transpose(1, 2)


def varlen_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Optional[Tensor] = None,
    cu_seq_lens_k: Optional[Tensor] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature over packed sequences: ``query [1, H, T, d]``,
    ``key, value [1, Hkv, T, d]`` (grouped-query heads are repeated), causal within each sequence
    of ``cu_seq_lens_q/k``. Returns ``([1, T, H, d], None)`` as transformers' functions do."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(
            f"The {ATTN_IMPLEMENTATION!r} attention runs packed sequences only and got no cu_seq_lens_q/k; "
            "run the prefill through vlm.towers.packed_prefill (LlavaBackbone(packed_prefill=True)), "
            "or load the model with attn_implementation='sdpa'."
        )
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or attention_mask is not None:  # no device sync
        raise ValueError(
            f"{ATTN_IMPLEMENTATION!r}: packed input is one row of all samples' tokens with no padding mask and no "
            f"cached prefix; got query {tuple(query.shape)}, keys {tuple(key.shape)}, "
            f"mask {'given' if attention_mask is not None else 'None'}."
        )
    if dropout and module.training:
        raise ValueError(f"{ATTN_IMPLEMENTATION!r} has no attention dropout; set the model's attention_dropout to 0.")
    heads, kv_heads = query.shape[1], key.shape[1]
    q = query[0].transpose(0, 1)  # [T, H, d], a strided view
    k, v = (t[0].transpose(0, 1) for t in (key, value))
    if kv_heads != heads:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    spec = AttnSpec(cu_seqlens_q=cu_seq_lens_q.to(torch.int32), cu_seqlens_k=cu_seq_lens_k.to(torch.int32),
                    causal=True, scale=scaling)
    return attention(q, k, v, spec).out[None], None


def register() -> None:
    """Register :func:`varlen_attention_forward` as transformers' ``vlm_varlen`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)


@contextmanager
def attention_implementation(lm: nn.Module, name: str) -> Iterator[None]:
    """``lm``'s attention implementation is ``name`` inside the block, its own again after it."""
    config = lm.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def layer_position_ids(positions: Tensor) -> Optional[Tensor]:
    """What a decoder layer gets as ``position_ids``: 1-D ids ``[B, L]`` as they are; None for
    M-RoPE ids ``[A, B, L]``, as transformers' Qwen text models pass (their RoPE tables carry the
    positions, and FlashAttention must not read 3-D ids as packing)."""
    return positions if positions.dim() == 2 else None


def run_packed(
    lm: nn.Module, layers: range, h: Tensor, layout: PackedLayout, position_ids: Tensor, cache=None,
    adds: Optional[Tensor] = None,
) -> Tensor:
    """Decoder ``layers`` of ``lm`` (a ``LlamaModel``-like decoder: ``layers``, ``rotary_emb``) over
    the packed row ``h [1, T, D]`` with packed ``position_ids [1, T]`` (M-RoPE: ``[A, 1, T]``),
    filling ``cache`` (packed ``[1, Hkv, T, d]`` per layer) if given; after layer ``i`` the row gets
    ``adds[i]`` (packed ``[n, 1, T, D]``, for ``i < n``: Qwen3-VL's DeepStack, zeros off the visual
    tokens), if given. For callers that drive the layers themselves."""
    register()
    rope = lm.rotary_emb(h, position_ids=position_ids)
    ids = layer_position_ids(position_ids)
    cu = layout.cu_seqlens
    packing = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=layout.max_len, max_length_k=layout.max_len)
    with attention_implementation(lm, ATTN_IMPLEMENTATION):
        for i in layers:
            h = lm.layers[i](h, attention_mask=None, position_ids=ids, cache=cache, use_cache=cache is not None,
                             position_embeddings=rope, **packing)
            if adds is not None and i < adds.shape[0]:
                h = h + adds[i].to(h.dtype)
    return h


def repad_cache(packed_cache, cache, layout: PackedLayout, layers: range) -> None:
    """Copy ``layers`` of ``packed_cache`` (filled by a packed run) into ``cache``, re-padded to
    ``[B, Hkv, L, d]`` (zeros on padding, which the decode steps' 2-D mask hides)."""
    for i in layers:
        layer = packed_cache.layers[i]
        cache.update(layout.unpack_heads(layer.keys), layout.unpack_heads(layer.values), i)


def scratch_cache(lm: nn.Module):
    """An empty ``DynamicCache`` for ``lm``'s layers."""
    from transformers import DynamicCache

    return DynamicCache(config=lm.config)


def packed_prefill(
    lm: nn.Module, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None
) -> Tensor:
    """Final-norm hidden states ``[B, L, D]`` of the decoder ``lm`` over the padded batch
    (``embeds [B, L, D]``, ``attention_mask [B, L]``, ``position_ids [B, L]``), computed packed
    (module docstring); zeros on padding. An empty ``cache`` is filled with the padded keys and
    values of every layer, ready for decoding."""
    register()
    layout = PackedLayout.from_mask(attention_mask)
    cu = layout.cu_seqlens
    scratch = None
    if cache is not None:
        if cache.get_seq_length() != 0:
            raise ValueError("packed_prefill fills an empty cache; this one already holds tokens.")
        scratch = scratch_cache(lm)
    with attention_implementation(lm, ATTN_IMPLEMENTATION):
        h = lm(
            inputs_embeds=layout.pack(embeds), attention_mask=None, position_ids=layout.pack(position_ids),
            cache=scratch, use_cache=scratch is not None,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=layout.max_len, max_length_k=layout.max_len,
        ).last_hidden_state
    if scratch is not None:
        repad_cache(scratch, cache, layout, range(len(scratch.layers)))
    return layout.unpack(h)
