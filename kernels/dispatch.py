"""Choose an attention backend per call: PyTorch's fused SDPA where it can express the spec, the
fused Triton kernel for the structured masks it cannot, else the reference.

All backends implement the same contract (``spec.py``); ``reference.py`` defines it.
:func:`choose_route` is the decision, a pure function of the spec's structure, the device type,
dtype and sizes (no tensor is read), so it is unit-tested on a CPU-only machine:

* plain softmax specs with at most padding (``k_lengths``) and causal masks go to a PyTorch fused
  op that also returns the row logsumexp: on CUDA the flash kernel (fp16/bf16, no padding, square
  when causal) or the memory-efficient kernel (fp32, padding, bottom-right causal through an
  additive mask); on CPU the fused CPU flash operator. Probe rows are recomputed from the lse.
* everything else (groups, ``row_subset``, ``all_keys``, ``segmented``, ``topk``,
  ``epilogue_add``, varlen) goes to the Triton kernel on CUDA, and to the reference on CPU;
  packed varlen calls the kernel does not take run sequence by sequence, each on its own route.

The lse returned by the SDPA routes carries no gradient (PyTorch's ops do not differentiate it).
``VLM_ATTENTION_BACKEND`` forces ``reference``, ``torch`` (never Triton) or ``triton``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from vlm.kernels.reference import mean_query_weights, per_sequence_attention, reference_attention, structural_mask
from vlm.kernels.spec import AttnOutput, AttnSpec

_CPU_FLASH: Optional[Callable] = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

#: Environment switch to force one backend: ``reference``, ``torch`` or ``triton``.
BACKEND_ENV = "VLM_ATTENTION_BACKEND"
#: The routes :func:`choose_route` returns.
ROUTES = ("reference", "cpu_flash", "sdpa_flash", "sdpa_efficient", "triton")
_SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_module():
    try:
        from vlm.kernels import triton_attention
    except ImportError:  # triton missing or kernel module not importable on this platform
        return None
    return triton_attention


def sdpa_expressible(spec: AttnSpec, nq: int, nk: int) -> bool:
    """True when the spec is softmax attention that an SDPA kernel computes exactly: at most
    padding and causal masks, padded (not packed) input, and every row sees a key when the shape
    alone decides (bottom-right causal with ``Nq > Nk`` leaves rows without keys)."""
    return spec.is_plain and not spec.is_varlen and not (spec.causal and nq > nk)


def choose_route(spec: AttnSpec, *, device_type: str, dtype: torch.dtype, head_dim: int, nq: int, nk: int,
                 lengths_ok: bool = True, triton_ok: bool = False, flash_capable: bool = True,
                 forced: Optional[str] = None) -> str:
    """The backend of one call, one of :data:`ROUTES`.

    ``lengths_ok``: every ``k_lengths`` entry is > 0 (a row without keys follows the reference's
    "output 0, lse -inf" rule, which the fused ops do not). ``triton_ok``: the Triton kernel
    supports the call (``triton_attention.supports``). ``flash_capable``: the CUDA device runs
    PyTorch's flash kernel (sm_80 or newer). ``forced``: the value of ``VLM_ATTENTION_BACKEND``.
    """
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not triton_ok:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but the Triton kernel does not support this call "
                f"(device={device_type}, dtype={dtype}, head dim={head_dim}).")
        return "triton"
    fused = sdpa_expressible(spec, nq, nk) and lengths_ok
    if device_type == "cuda":
        if fused and dtype in _SDPA_DTYPES and head_dim % 8 == 0 and head_dim <= 256:
            square_or_plain = not spec.causal or nq == nk
            if dtype != torch.float32 and flash_capable and spec.k_lengths is None and square_or_plain:
                return "sdpa_flash"
            return "sdpa_efficient"
        if triton_ok and forced != "torch":
            return "triton"
        return "reference"
    if fused and _CPU_FLASH is not None and dtype in (*_SDPA_DTYPES, torch.float64):
        return "cpu_flash"
    return "reference"


def _lengths_ok(spec: AttnSpec) -> bool:
    return spec.k_lengths is None or bool((spec.k_lengths > 0).all())


def _additive_mask(spec: AttnSpec, b: int, nq: int, nk: int, dtype: torch.dtype, device) -> Tensor:
    """``[B, 1, Nq, Nk]`` additive mask (0 / -inf) of padding and bottom-right causal. The row
    stride is padded to a multiple of 16 elements, as the CUDA memory-efficient kernel requires."""
    allowed = structural_mask(spec, b, nq, nk, device)
    pad = (-nk) % 16
    mask = torch.zeros(b, 1, nq, nk + pad, dtype=dtype, device=device)[..., :nk]
    return mask.masked_fill_(~allowed, float("-inf"))


def _probe_rows_mask(spec: AttnSpec, rows: Tensor, b: int, nq: int, nk: int, device) -> Optional[Tensor]:
    """``[B, 1, P, Nk]`` bool structural mask of the probe rows only, or None without one."""
    if spec.k_lengths is None and not spec.causal:
        return None
    keys = torch.arange(nk, device=device)
    allowed = torch.ones(b, 1, rows.numel(), nk, dtype=torch.bool, device=device)
    if spec.k_lengths is not None:
        allowed = allowed & (keys[None, :] < spec.k_lengths.to(device)[:, None])[:, None, None, :]
    if spec.causal:
        allowed = allowed & (keys[None, :] <= rows[:, None] + (nk - nq))
    return allowed


def probe_weights(q: Tensor, k: Tensor, lse: Tensor, spec: AttnSpec) -> Tensor:
    """``probes [B, H, P, Nk]`` recomputed from the probe rows' queries and the row logsumexp:
    ``p_ij = exp(q_i . k_j * scale - lse_i)`` on the row's structural keys, O(P * Nk * d)
    instead of a full attention matrix."""
    rows = spec.probe_rows.to(q.device)
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale
    allowed = _probe_rows_mask(spec, rows, q.shape[0], q.shape[2], k.shape[2], q.device)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.exp(logits - lse[:, :, rows, None])


def torch_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> AttnOutput:
    """Plain softmax attention through PyTorch's fused CPU kernel, with the row logsumexp."""
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    if spec.causal and nq > nk:  # rows with no key: the exact definition
        return reference_attention(q, k, v, spec)
    mask = None
    if spec.k_lengths is not None or spec.causal:
        mask = _additive_mask(spec, b, nq, nk, q.dtype, q.device)
    out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=spec.scale)
    lse = lse.float()
    probes = None if spec.probe_rows is None else probe_weights(q, k, lse, spec)
    return AttnOutput(out, lse, probes)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, route: str) -> AttnOutput:
    """Plain softmax attention through PyTorch's CUDA flash or memory-efficient op (``route``),
    with the row logsumexp and, from it, the probe rows."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if route == "sdpa_flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, bool(spec.causal), False,
                                                                 scale=spec.scale)
        out, lse = res[0], res[1]
    else:
        square = nq == nk and spec.k_lengths is None
        bias = None
        if spec.k_lengths is not None or (spec.causal and not square):
            bias = _additive_mask(spec, b, nq, nk, q.dtype, q.device).expand(b, h, nq, nk)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, bool(spec.causal) and bias is None, scale=spec.scale)
        out, lse = res[0], res[1][..., :nq]  # the lse rows are padded to a multiple of 32
    lse = lse.float()
    probes = None if spec.probe_rows is None else probe_weights(q, k, lse, spec)
    return AttnOutput(out, lse, probes)


def attention(q: Tensor, k: Tensor, v: Tensor, spec: Optional[AttnSpec] = None) -> AttnOutput:
    """Masked attention as declared by ``spec`` (docs/contracts.md). Returns ``AttnOutput``, with
    ``values=v`` when ``spec.return_values`` and the mean-query weights when
    ``spec.probe_mean_query``."""
    spec = spec or AttnSpec()
    out = _attention(q, k, v, spec)
    if spec.return_values:
        out = out._replace(values=v)
    if spec.probe_mean_query:  # one extra row per sample, from q and k alone: the same on every route
        out = out._replace(mean_probe=mean_query_weights(q, k, spec))
    return out


def _attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> AttnOutput:
    """The route and the backend call of :func:`attention`."""
    forced = os.environ.get(BACKEND_ENV)
    dev = q.device.type
    mod = _triton_module() if forced != "reference" and (dev == "cuda" or forced == "triton") else None
    nq, nk = q.shape[-2], k.shape[-2]
    # reading k_lengths syncs with the device: only when the answer can change the route
    skip_lengths = forced in ("reference", "triton") or not sdpa_expressible(spec, nq, nk)
    route = choose_route(
        spec, device_type=dev, dtype=q.dtype, head_dim=q.shape[-1], nq=nq, nk=nk,
        lengths_ok=skip_lengths or _lengths_ok(spec),
        triton_ok=mod is not None and mod.supports(q, k, v, spec),
        flash_capable=dev == "cuda" and torch.cuda.get_device_capability(q.device)[0] >= 8, forced=forced)
    if route == "triton":
        return mod.triton_attention(q, k, v, spec)
    if spec.is_varlen and forced != "reference":
        return per_sequence_attention(q, k, v, spec, inner=attention)  # each sequence takes its own route
    if route in ("sdpa_flash", "sdpa_efficient"):
        return sdpa_attention(q, k, v, spec, route)
    if route == "cpu_flash":
        return torch_attention(q, k, v, spec)
    return reference_attention(q, k, v, spec)
