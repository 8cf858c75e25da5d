"""Choose an attention backend per call: fused Triton on CUDA, fast PyTorch on CPU, else reference.

All backends implement the same contract (``spec.py``); ``reference.py`` defines it. The CPU fast
path uses PyTorch's fused CPU flash-attention operator, which also returns the per-row
logsumexp, for specs that are plain softmax attention with at most padding and causal masks.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from vlm.kernels.reference import reference_attention, structural_mask
from vlm.kernels.spec import AttnOutput, AttnSpec

_CPU_FLASH: Optional[Callable] = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

#: Environment switch to force one backend: ``reference``, ``torch`` or ``triton``.
BACKEND_ENV = "VLM_ATTENTION_BACKEND"


def _triton_module():
    try:
        from vlm.kernels import triton_attention
    except ImportError:  # triton missing or kernel module not importable on this platform
        return None
    return triton_attention


def _cpu_fast_ok(q: Tensor, spec: AttnSpec) -> bool:
    if _CPU_FLASH is None or q.is_cuda or spec.is_varlen or not spec.is_plain:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return False
    # Rows with no key at all (length 0) follow the reference's "output 0, lse -inf" rule.
    return spec.k_lengths is None or bool((spec.k_lengths > 0).all())


def torch_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> AttnOutput:
    """Plain softmax attention through PyTorch's fused CPU kernel, with the row logsumexp."""
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    mask = None
    if spec.k_lengths is not None or spec.causal:
        allowed = structural_mask(spec, b, nq, nk, q.device)
        if spec.causal and nq > nk:  # rows with no key: fall back to the exact definition
            return reference_attention(q, k, v, spec)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=spec.scale)
    lse = lse.float()
    probes = None if spec.probe_rows is None else probe_weights(q, k, lse, spec, mask)
    return AttnOutput(out, lse, probes)


def probe_weights(q: Tensor, k: Tensor, lse: Tensor, spec: AttnSpec, mask: Optional[Tensor]) -> Tensor:
    """``probes [B, H, P, Nk]`` recomputed from the probe rows' queries and the row logsumexp:
    ``p_ij = exp(q_i . k_j * scale - lse_i)``, O(P * Nk * d) instead of a full attention matrix.
    ``mask`` is the additive ``[B, 1, Nq, Nk]`` mask the fused call used, or None."""
    rows = spec.probe_rows.to(q.device)
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits + mask[:, :, rows].float()
    return torch.exp(logits - lse[:, :, rows, None])


def attention(q: Tensor, k: Tensor, v: Tensor, spec: Optional[AttnSpec] = None) -> AttnOutput:
    """Masked attention as declared by ``spec`` (see CONTRACTS.md). Returns ``AttnOutput``."""
    spec = spec or AttnSpec()
    forced = os.environ.get(BACKEND_ENV)
    if forced == "reference":
        return reference_attention(q, k, v, spec)
    if q.is_cuda or forced == "triton":
        mod = _triton_module()
        if mod is not None and mod.supports(q, k, v, spec):
            return mod.triton_attention(q, k, v, spec)
        if forced == "triton":
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but the Triton kernel does not support this call "
                f"(device={q.device}, dtype={q.dtype}, head dim={q.shape[-1]})."
            )
    if _cpu_fast_ok(q, spec):
        return torch_attention(q, k, v, spec)
    return reference_attention(q, k, v, spec)
