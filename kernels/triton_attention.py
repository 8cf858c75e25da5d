"""Fused masked attention in Triton: every :class:`AttnSpec` field, forward and backward.

``dispatch.attention`` calls :func:`supports` and :func:`triton_attention` on CUDA for the specs
PyTorch's SDPA kernels cannot express (plain, padded and causal calls go to SDPA), or on CPU
under ``TRITON_INTERPRET=1`` with ``VLM_ATTENTION_BACKEND=triton``, which is how the CPU tests
reach it. ``reference.py`` is the definition this module reproduces.

How each field is computed (kernels in ``triton_attn_kernels.py``, masks and tile helpers in
``triton_attn_masks.py``, argument bundles in ``triton_attn_args.py``, mask layout and tile lists
in ``triton_attn_layout.py``, launches in ``triton_attn_ops.py``):

* **Flash attention**: online softmax over key tiles, fp32 accumulation, per-row
  ``lse = log sum_j e^{s_ij}`` saved; the backward recomputes ``P = e^{s - lse}`` tile by tile
  (FlashAttention-2: one kernel for dK/dV, one for dQ, ``D = rowsum(dO ⊙ (O - epilogue))``).
* **Tiles**: per query tile (per key tile for ``dK/dV``) a host-built compact list of the key
  tiles that run, full ones first (FlexAttention's block-mask idea). Empty tiles are not listed
  (under ``all_keys`` they still feed the denominator and run masked); full tiles -- inside every
  bound and every pair allowed -- run with unconditional, pipelined K/V loads and no mask; only
  partial tiles evaluate masks. The lists are cached per set of mask tensors
  (``triton_attn_layout.LAYOUT_CACHE``), so only the first call of a pass builds them.
* **Groups + allow**: each query group's allowed key groups are two int32 bit words (at most 64
  key groups), read per row; no N x N mask.
* **k_lengths / varlen / causal / Nq != Nk**: loop bounds plus an index predicate (causal is
  bottom-right aligned: ``j <= i + Nk - Nq``); packed ``[T, H, D]`` input indexes rows from
  ``cu_seqlens``.
* **row_subset**: bit ``r % 64`` of word ``r // 64`` of the row, ``r`` the key's rank inside
  ``subset_group``. With ``normalize="all_keys"`` the denominator runs over the structural keys,
  the semantic mask ``M`` only zeroes weights, and
  ``dS = P_all ⊙ (M ⊙ dP - rowsum(M ⊙ P_all ⊙ dP))`` (the rowsum is still ``dO · O``).
* **segmented**: the exact gate ``Z_g / sum Z`` *is* softmax and runs as such. A given gate
  (float or tensor broadcastable to ``[B, H, Nq, Gk]``) runs two passes: row max ``m`` and
  ``Z_g = sum_{j in g} e^{s_j - m}``, then ``O = sum_j (gate_g / Z_g) e^{s_j - m} v_j``. Its
  backward uses ``D_g = sum_{j in g} (e^{s_j - m} / Z_g) dP_j`` per group, which is also
  ``d gate_g``: a gate tensor that requires grad gets it (summed to its own shape).
* **topk**: pass 1 finds each row's k-th largest logit of its base set with a running
  sorted top-k list (``k <= 256``; ``k >= Nk`` is dropped as a no-op) merged with each key tile; the
  attention passes keep ``s >= threshold`` (ties keep all). Logits are computed with identical tile
  shapes in every pass so the comparison is bit-exact.
* **epilogue_add**: added in the epilogue; its gradient is ``sum_rows dO``.
* **probe_rows**: a small kernel recomputes the selected rows' final weights from the saved
  ``lse`` (``P x Nk`` logits). Probes carry no gradient.
* **dtypes / head dims**: fp32, fp16, bf16; ``D`` in {16, 32, 64, 128}. fp32 dots use TF32 on a
  GPU by default (``triton_attn_ops.FP32_DOT``: ``tf32x3`` or ``ieee`` for exact products).
  Under the interpreter products are exact and fp16/bf16 tiles are upcast to fp32 (its bf16 dot
  is wrong).
* Fully masked rows give ``out = 0`` (+ epilogue), ``lse = -inf`` and zero, finite gradients.
* The gradient of ``lse`` is supported (``dS += P ⊙ dlse``) except with a fixed segment gate.

``torch.compile``: the kernels sit behind two ``torch.library`` custom ops
(``vlm::triton_attn_fwd/bwd``) with fake implementations, called from a
``torch.autograd.Function``, so the attention is a single node without a graph break. The graph
breaks that remain are data-dependent host values: a fixed segment gate without ``allow`` reads
``k_groups.max()`` to size the groups, and varlen ``probe_rows`` splits the probes per sequence
with ``cu_seqlens_k.tolist()``.

Inputs are read through their strides (views of a fused qkv or a transposed layout are not
copied) as long as the head dim is contiguous; program ids are flat (no 65535 grid-axis limit)
and batch/head offsets are int64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlm.kernels.spec import AttnOutput, AttnSpec
from vlm.kernels.triton_attn_layout import MAX_KEY_GROUPS
from vlm.kernels.triton_attn_ops import (INTERPRET, MAX_TOPK_BLOCK, triton_attn_bwd,
                                         triton_attn_fwd)

import triton

__all__ = ["supports", "supports_call", "triton_attention", "TritonAttentionFunction"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128)


class TritonAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward are the fused kernels.

    Differentiable inputs: ``q``, ``k``, ``v``, ``epi`` (``epilogue_add``) and ``gate`` (a
    ``segment_gate`` tensor). Outputs ``(out, lse, probes)``; ``probes`` is non-differentiable,
    and so is ``lse`` under a fixed segment gate.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, epi: Optional[Tensor], gate: Optional[Tensor],
                cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor], qg: Optional[Tensor],
                kg: Optional[Tensor], allow: Optional[Tensor], row_subset: Optional[Tensor],
                probe_rows: Optional[Tensor], causal: bool, subset_group: int, mode: str, gate_value: float,
                topk: int, scale: float, num_groups: int):
        out, lse, probes, thr, shift, mult, z = triton_attn_fwd(
            q, k, v, epi, gate, cu_q, cu_k, klen, qg, kg, allow, row_subset, probe_rows, causal,
            subset_group, mode, gate_value, topk, scale, num_groups)
        ctx.save_for_backward(q, k, v, out, lse, thr, shift, mult, z, epi, gate, cu_q, cu_k, klen, qg, kg,
                              allow, row_subset)
        ctx.opts = (causal, subset_group, mode, topk, scale, num_groups)
        ctx.mark_non_differentiable(probes)
        if mode == "fixed":
            ctx.mark_non_differentiable(lse)
        return out, lse, probes

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Optional[Tensor], dprobes: Optional[Tensor]):
        (q, k, v, out, lse, thr, shift, mult, z, epi, gate, cu_q, cu_k, klen, qg, kg, allow,
         row_subset) = ctx.saved_tensors
        causal, subset_group, mode, topk, scale, num_groups = ctx.opts
        if mode == "fixed":
            dlse = None
        dq, dk, dv, depi, dgate = triton_attn_bwd(
            dout, dlse, q, k, v, out, lse, thr, shift, mult, z, epi, cu_q, cu_k, klen, qg, kg, allow,
            row_subset, causal, subset_group, mode, topk, scale, num_groups)
        d_epi = depi.to(epi.dtype) if epi is not None and ctx.needs_input_grad[3] else None
        d_gate = None
        if gate is not None and ctx.needs_input_grad[4]:
            if cu_q is not None:
                d_gate = dgate.sum().reshape(gate.shape).to(gate.dtype)
            else:
                d_gate = dgate.sum_to_size(gate.shape).to(gate.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_epi, d_gate) + (None,) * 15


def _device_ok(t: Tensor) -> bool:
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def supports(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> bool:
    """True when the fused kernels implement this call exactly (else dispatch falls back)."""
    if not (_device_ok(q) and k.device == q.device and v.device == q.device):
        return False
    return supports_call(q, k, v, spec)


def supports_call(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> bool:
    """:func:`supports` without the device check: dtypes, shapes and spec fields only (what
    ``offline_compile`` asks of CPU tensors that stand in for CUDA ones)."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in _HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return False
    rank = 3 if spec.is_varlen else 4
    if q.dim() != rank or k.dim() != rank or v.dim() != rank or k.shape != v.shape:
        return False
    if spec.is_varlen and (q.shape[1] != k.shape[1] or spec.k_lengths is not None):
        return False
    if not spec.is_varlen and (q.shape[:2] != k.shape[:2]):
        return False
    if spec.normalize == "segmented" and spec.k_groups is None:
        return False  # the reference raises; let it
    if spec.row_subset is not None and spec.allow is None and spec.q_groups is None:
        return False
    if spec.allow is not None and spec.allow.shape[1] > MAX_KEY_GROUPS:
        return False
    total_k = k.shape[0] if spec.is_varlen else k.shape[2]
    if spec.topk is not None and spec.topk < total_k and triton.next_power_of_2(spec.topk) > MAX_TOPK_BLOCK:
        return False
    gate = spec.segment_gate
    if spec.normalize == "segmented" and gate is not None:
        if isinstance(gate, Tensor):
            if spec.is_varlen and gate.numel() != 1:
                return False
            if gate.dim() > 4 or gate.device != q.device and gate.numel() != 1:
                return False
    if spec.epilogue_add is not None and spec.epilogue_add.shape[-1] != q.shape[-1]:
        return False
    return True


def triton_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> AttnOutput:
    """Masked attention by the fused kernels; same contract as ``reference_attention``."""
    d = q.shape[-1]
    scale = float(spec.scale) if spec.scale is not None else d ** -0.5
    mode = spec.normalize
    gate_t: Optional[Tensor] = None
    gate_value = 0.0
    num_groups = 0
    if mode == "segmented":
        if spec.segment_gate is None:
            mode = "softmax"  # the exact gate Z_g / sum Z reproduces softmax
        else:
            mode = "fixed"
            if isinstance(spec.segment_gate, Tensor):
                gate_t = spec.segment_gate.to(q.device)
            else:
                gate_value = float(spec.segment_gate)
            num_groups = int(spec.allow.shape[1]) if spec.allow is not None else int(spec.k_groups.max()) + 1
    has_groups = spec.q_groups is not None and (spec.allow is not None or spec.row_subset is not None
                                                or mode == "fixed")
    out, lse, probes = TritonAttentionFunction.apply(
        q, k, v, spec.epilogue_add, gate_t, spec.cu_seqlens_q, spec.cu_seqlens_k, spec.k_lengths,
        spec.q_groups if has_groups else None, spec.k_groups if has_groups else None, spec.allow,
        spec.row_subset, spec.probe_rows, bool(spec.causal),
        int(spec.subset_group) if spec.subset_group is not None else -1, mode, gate_value,
        int(spec.topk) if spec.topk is not None else 0, scale, num_groups)
    if spec.probe_rows is None:
        return AttnOutput(out, lse, None)
    if spec.is_varlen:  # packed [H, P, Tk] -> per sequence [H, P, Nk_i], as the reference returns
        ck = spec.cu_seqlens_k.tolist()
        return AttnOutput(out, lse, [probes[:, :, ck[i]: ck[i + 1]] for i in range(len(ck) - 1)])
    return AttnOutput(out, lse, probes)

