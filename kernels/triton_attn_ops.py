"""Host side of the fused attention: argument preparation, launches, and the two custom ops.

``prepare`` turns an attention call into the argument block every kernel in
``triton_attn_kernels.py`` shares (the bundles of ``triton_attn_args.py``: q/k/v views with their
strides, the cached :class:`Layout` -- int32 group ids, subset ranks, ``allow`` words, compact tile
lists -- and the constexpr switches). ``vlm::triton_attn_fwd`` and ``vlm::triton_attn_bwd`` wrap the launches as
``torch.library`` custom ops with shape-only fake implementations, so ``torch.compile`` sees each
as one opaque node (no graph break inside; the host-side ``.item()``/``.tolist()`` calls here are
invisible to the tracer).

Options shared by both ops (all plain Python values): ``causal``; ``subset_group`` (-1: none);
``mode`` = ``"softmax"`` (also the segmented exact gate, which is softmax), ``"all_keys"`` or ``"fixed"``
(segmented with a given gate); ``gate_value`` (the float gate when no gate tensor is given);
``topk`` (0: none); ``scale``; ``num_groups`` (key groups of the fixed gate, else 0).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from vlm.kernels import triton_attn_kernels as K
from vlm.kernels.triton_attn_args import Cfg, View
from vlm.kernels.triton_attn_layout import Layout, layout, subset_words

#: True when kernels run under the Triton CPU interpreter (read once, like ``triton.jit`` does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M = 64
BLOCK_N = 64
#: Top-k merge by ``tl.sort`` (GPU); the interpreter uses an equivalent rank-based merge.
TOPK_SORT = not INTERPRET
#: Widest running top-k list of the threshold pass (so the largest supported ``k``).
MAX_TOPK_BLOCK = 256
#: Input precision of the dots for fp32 tensors on a GPU: ``"tf32"`` (tensor cores, like torch's
#: ``allow_tf32``; the default), ``"tf32x3"`` (tensor cores, about fp32 accuracy; the compiled
#: kernel tests use it for their fp32 tolerances) or ``"ieee"`` (exact fp32 products on the FMA
#: units: many times slower, and those kernels spill). ``VLM_TRITON_FP32_DOT`` sets it at import.
#: The interpreter computes exact fp32 products whatever the flag says.
FP32_DOT = os.environ.get("VLM_TRITON_FP32_DOT", "ieee" if INTERPRET else "tf32")
_DOT_CHOICES = ("ieee", "tf32", "tf32x3")


def topk_block(topk: int) -> int:
    """Width of the running top-k list: a power of two >= k (and >= the key tile)."""
    return max(BLOCK_N, triton.next_power_of_2(topk))


def dot_precision(dtype: torch.dtype) -> str:
    """The ``DOT`` constexpr for inputs of ``dtype`` (see :data:`FP32_DOT`)."""
    if INTERPRET:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"  # 16-bit operands: only the fp32 one-hot group sums read it
    if FP32_DOT not in _DOT_CHOICES:
        raise ValueError(f"FP32_DOT / VLM_TRITON_FP32_DOT must be one of {_DOT_CHOICES}, got {FP32_DOT!r}")
    return FP32_DOT


@dataclasses.dataclass
class Prepared:
    """Everything the launches of one call need (built per call from the cached :class:`Layout`)."""

    q: View
    k: View
    v: View
    varlen: bool
    batch: int
    heads: int
    head_dim: int
    max_nq: int
    max_nk: int
    aux_shape: tuple[int, ...]
    layout: Layout
    cfg: Cfg
    scale: float
    thr: Optional[Tensor]  # per-row top-k thresholds (None without top-k)
    rs: Optional[Tensor]  # the call's row_subset words (None without)

    @property
    def block_m(self) -> int:
        return self.cfg.BLOCK_M.value

    @property
    def block_n(self) -> int:
        return self.cfg.BLOCK_N.value

    def grid(self, by: str, chunks: int = 0) -> tuple[int, ...]:
        """Flat grid over (tile, batch x head): ``by`` = ``"q"`` (query tiles) or ``"k"`` (key tiles)."""
        tiles = triton.cdiv(self.max_nq, self.block_m) if by == "q" else triton.cdiv(self.max_nk, self.block_n)
        flat = tiles * self.batch * self.heads
        return (flat,) if not chunks else (flat, chunks)

    def launch(self, kernel, grid, *extra, by: str = "q", **switches) -> None:
        """Launch ``kernel`` with the shared argument block, ``extra`` runtime args and switches."""
        if any(g == 0 for g in grid):
            return
        lay = self.layout
        cfg = self.cfg.with_(**switches) if switches else self.cfg
        masks = lay.masks._replace(thr=self.thr, rs=self.rs)
        tiles = lay.tiles_q if by == "q" else lay.tiles_k
        warps, stages = launch_config(kernel.__name__, self.block_m, self.block_n, self.head_dim,
                                      self.q.ptr.element_size(), bool(self.cfg.HAS_TOPK.value))
        args = (self.q, self.k, self.v, lay.seqs, masks, tiles, self.heads, lay.nq_arg, lay.nk_arg, self.scale,
                *extra, cfg)
        LAUNCHER(kernel, tuple(grid), args, dict(num_warps=warps, num_stages=stages, maxnreg=MAX_REGISTERS))


def launch_config(kernel: str, block_m: int, block_n: int, head_dim: int, itemsize: int,
                  same_layout: bool) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of ``kernel`` in one call.

    Warps: 8 for ``d = 128`` query tiles and for K tiles of 8 KiB or more (fp32 ``d >= 32``, 16-bit
    ``d >= 64``), else 4. ``same_layout`` (top-k: kernels compare each other's logits bit for bit,
    so all must use one MMA layout) keeps that one value for every kernel. Otherwise the backward
    kernels, which hold two ``[BLOCK, D]`` accumulators and both K and V (or Q and dO), take 8
    warps from ``64 x 64`` tiles on, and the fixed gate's group sums (16-32 row tiles, where more
    warps only split the key axis) take 4. Stages (K/V tiles in flight through the async-copy
    pipeline) do not change the arithmetic and come from :data:`STAGES` by the bytes of one K tile.
    These are the choices under which the offline compile table shows no forward-kernel spill
    (``maxnreg`` = :data:`MAX_REGISTERS`).
    """
    warps = 8 if block_m * head_dim >= 64 * 128 or block_n * head_dim * itemsize >= 8192 else 4
    if not same_layout and kernel.startswith("attn_bwd") and block_n * head_dim >= 64 * 64:
        warps = 8
    if not same_layout and kernel == "attn_group_sums":
        warps = 4
    tile_bytes = block_n * head_dim * itemsize
    small, mid, large = STAGES.get(kernel, STAGES["default"])
    stages = small if tile_bytes <= 8192 else mid if tile_bytes <= 16384 else large
    return warps, stages


#: Registers per thread ptxas may use (``.maxnreg``). Without it ptxas aims at a lower count for
#: occupancy and spills a few bytes at 96-168 registers; the attention tiles want the whole
#: budget (at 8 warps 255 x 256 threads still fits the 64K register file).
MAX_REGISTERS = 255

#: ``kernel -> (stages for K tiles <= 8 KiB, <= 16 KiB, larger)``.
STAGES: dict[str, tuple[int, int, int]] = {
    "default": (3, 2, 1),
    "attn_bwd_dkdv": (2, 1, 1),
    "attn_bwd_dq": (2, 1, 1),
}


def backward_tile_shape(head_dim: int, itemsize: int, mode: str) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of ``dK/dV`` and ``dQ`` when no top-k ties them to the forward's tiles.

    The backward kernels hold K and V (or Q and dO) *and* two accumulators, so they take at most
    32-row tiles (fewer where the forward's are smaller), and 32-wide key tiles where a key row is 256 bytes or more (fp32 ``d >= 64``, 16-bit
    ``d = 128``) or with the fixed gate's per-(row, group) terms: the compile table's ``64 x 64``
    backward spilled up to ~800 bytes there, these spill nothing.
    """
    return 32, 32 if head_dim * itemsize >= 256 or mode == "fixed" else 64


def tile_shape(head_dim: int, itemsize: int, mode: str, topk_w: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the forward kernels of one call.

    fp32 ``d = 128`` key tiles are 32 wide (a ``64 x 128`` fp32 K tile plus V is most of the
    register file). Top-k calls take 32 rows: the threshold pass keeps a ``[BLOCK_M, topk_w]``
    list, and the backward must use these same tiles (its ``s >= threshold`` test compares
    logits bit for bit). The fixed segment gate holds per-(row, group) multipliers, so it takes
    32 rows (16 in fp32 or at ``d = 128``).
    """
    bn = 32 if head_dim >= 128 and itemsize >= 4 else BLOCK_N
    bm = BLOCK_M
    if topk_w:
        bm = min(bm, 32)
    elif mode == "fixed":
        bm = min(bm, 16 if head_dim > 64 or itemsize >= 4 else 32)
    return bm, bn


def launch_on_device(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """The default :data:`LAUNCHER`: compile (cached) and run ``kernel`` on the current device."""
    kernel[grid](*args, **kwargs)


#: Every kernel launch of this module goes through this callable ``(kernel, grid, args, kwargs)``.
#: ``vlm.kernels.offline.compile`` swaps in a recorder to compile the exact specialisations for a
#: GPU target without one.
LAUNCHER = launch_on_device


def as_view_input(t: Tensor) -> Tensor:
    """``t`` itself when its head dim is contiguous (strides go to the kernel), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def prepare(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
            klen: Optional[Tensor], qg: Optional[Tensor], kg: Optional[Tensor], allow: Optional[Tensor],
            row_subset: Optional[Tensor], causal: bool, subset_group: int, mode: str, topk: int,
            scale: float, thr: Optional[Tensor] = None, backward: bool = False) -> Prepared:
    """Build the argument block of one call (see ``triton_attn_args``); runs the top-k pass.

    ``backward``: the tiles of the backward kernels, which differ from the forward's unless top-k
    needs every pass to compute its logits in the same tiles (:func:`backward_tile_shape`)."""
    varlen = cu_q is not None
    q, k, v = as_view_input(q), as_view_input(k), as_view_input(v)
    if varlen:
        tq, heads, d = q.shape
        batch = cu_q.numel() - 1
    else:
        batch, heads, _, d = q.shape
    max_nk_total = k.shape[0] if varlen else k.shape[2]
    use_topk = 0 < topk < max_nk_total
    topk_w = topk_block(topk) if use_topk else 0
    bm, bn = tile_shape(d, q.element_size(), mode, topk_w)
    if backward and not use_topk:
        bwd_m, bwd_n = backward_tile_shape(d, q.element_size(), mode)
        bm, bn = min(bm, bwd_m), min(bn, bwd_n)
    lay = layout(q, k, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal, subset_group, mode == "all_keys", bm, bn)
    max_nq, max_nk = lay.nq_arg, lay.nk_arg
    use_topk = use_topk and topk < max_nk  # k >= every sequence's length keeps all keys
    aux_shape = (tq, heads) if varlen else (batch, heads, max_nq)
    has_allow = allow is not None
    upcast = INTERPRET and q.dtype in (torch.float16, torch.bfloat16)
    cfg = Cfg.make(
        VARLEN=varlen, HAS_KLEN=klen is not None, CAUSAL=bool(causal), HAS_ALLOW=has_allow,
        HAS_SUBSET=row_subset is not None, ALL_KEYS=mode == "all_keys", HAS_TOPK=use_topk,
        HAS_KG=kg is not None and (has_allow or mode == "fixed"), BLOCK_M=bm, BLOCK_N=bn, HEAD_D=d, UPCAST=upcast,
        DOT=dot_precision(q.dtype), **lay.flags)
    compute_thr = use_topk and (thr is None or thr.numel() == 0)
    if compute_thr:
        thr = torch.empty(aux_shape, dtype=torch.float32, device=q.device)
    elif not use_topk:
        thr = None
    prep = Prepared(View.of(q, varlen), View.of(k, varlen), View.of(v, varlen), varlen, batch, heads, d, max_nq,
                    max_nk, aux_shape, lay, cfg, float(scale), thr,
                    subset_words(row_subset, varlen, q.device) if row_subset is not None else None)
    if compute_thr:  # the threshold pass reads no threshold
        prep.launch(K.attn_topk_threshold, prep.grid("q"), topk, HAS_TOPK=False, SORT=TOPK_SORT, TOPK_W=topk_w)
    return prep


def _aux_empty(prep: Prepared, *tail: int) -> Tensor:
    return torch.empty(*prep.aux_shape, *tail, dtype=torch.float32, device=prep.q.ptr.device)


def _g_pad(num_groups: int) -> int:
    return max(16, triton.next_power_of_2(num_groups))


def _epi_rows(prep: Prepared, epi: Tensor, nq: int) -> Tensor:
    """``epilogue_add`` broadcast to the output layout (fp32)."""
    epi = epi.float()
    if prep.varlen:
        return epi[prep.layout.seg_q]  # [Tq, H, D]
    return epi[:, :, None, :].expand(-1, -1, nq, -1)


def _none(dev: torch.device) -> Tensor:
    """A fresh empty tensor for an unused op output (op outputs must not alias one another)."""
    return torch.empty(0, dtype=torch.float32, device=dev)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, epi: Optional[Tensor], gate: Optional[Tensor],
              cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor], qg: Optional[Tensor],
              kg: Optional[Tensor], allow: Optional[Tensor], row_subset: Optional[Tensor],
              probe_rows: Optional[Tensor], causal: bool, subset_group: int, mode: str, gate_value: float,
              topk: int, scale: float, num_groups: int) -> tuple[Tensor, ...]:
    prep = prepare(q, k, v, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal, subset_group, mode, topk, scale)
    dev = q.device
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    o_view = View.of(out, prep.varlen)
    epi = epi.contiguous() if epi is not None else None  # read as [B, H, D]
    fixed = mode == "fixed"
    ng = num_groups if fixed else 0
    if fixed:
        shift = _aux_empty(prep)
        z = torch.zeros(*prep.aux_shape, ng, dtype=torch.float32, device=dev)
        prep.launch(K.attn_group_sums, prep.grid("q"), shift, z, None, ng, WITH_DO=False, G_PAD=_g_pad(ng))
        g = gate.float() if gate is not None else torch.tensor(gate_value, dtype=torch.float32, device=dev)
        g = g.reshape(()) if prep.varlen else g
        g = g.expand(*prep.aux_shape, ng)
        has = z > 0
        mult = torch.where(has, g / torch.where(has, z, torch.ones_like(z)), torch.zeros_like(z)).contiguous()
        total = z.sum(-1)
        lse = torch.where(total > 0, shift + torch.log(torch.where(total > 0, total, torch.ones_like(total))),
                          torch.full_like(total, float("-inf")))
        prep.launch(K.attn_fwd, prep.grid("q"), o_view, None, epi, shift, mult, ng, FIXED=True,
                    HAS_EPI=epi is not None, G_PAD=_g_pad(ng))
    else:
        shift, mult, z = _none(dev), _none(dev), _none(dev)
        lse = _aux_empty(prep)
        prep.launch(K.attn_fwd, prep.grid("q"), o_view, lse, epi, None, None, 0, HAS_EPI=epi is not None)
    probes = _none(dev)
    if probe_rows is not None:
        p = probe_rows.numel()
        rows = probe_rows.to(device=dev, dtype=torch.int64)
        nk = k.shape[0] if prep.varlen else k.shape[2]
        shape = (prep.heads, p, nk) if prep.varlen else (prep.batch, prep.heads, p, nk)
        probes = torch.zeros(shape, dtype=torch.float32, device=dev)
        p_str = (0, p * nk, nk) if prep.varlen else (prep.heads * p * nk, p * nk, nk)
        prep.launch(K.attn_probes, prep.grid("k", triton.cdiv(p, prep.block_m)), probes, rows, p, *p_str,
                    shift if fixed else lse, mult if fixed else None, ng, FIXED=fixed, G_PAD=_g_pad(ng))
    total_k = k.shape[0] if prep.varlen else k.shape[2]
    if prep.thr is not None:
        thr = prep.thr
    elif 0 < topk < total_k:  # k >= every sequence's length: top-k keeps all, threshold -inf
        thr = torch.full(prep.aux_shape, float("-inf"), dtype=torch.float32, device=dev)
    else:
        thr = _none(dev)
    return out, lse, probes, thr, shift, mult, z


def _bwd_impl(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              thr: Tensor, shift: Tensor, mult: Tensor, z: Tensor, epi: Optional[Tensor], cu_q: Optional[Tensor],
              cu_k: Optional[Tensor], klen: Optional[Tensor], qg: Optional[Tensor], kg: Optional[Tensor],
              allow: Optional[Tensor], row_subset: Optional[Tensor], causal: bool, subset_group: int,
              mode: str, topk: int, scale: float, num_groups: int) -> tuple[Tensor, ...]:
    prep = prepare(q, k, v, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal, subset_group, mode, topk, scale,
                   thr, backward=True)
    dev = q.device
    dout = as_view_input(dout)
    do_view = View.of(dout, prep.varlen)
    fixed = mode == "fixed"
    ng = num_groups if fixed else 0
    dgate = _none(dev)
    if fixed:
        r = torch.zeros(*prep.aux_shape, ng, dtype=torch.float32, device=dev)
        prep.launch(K.attn_group_sums, prep.grid("q"), shift, r, do_view, ng, WITH_DO=True, G_PAD=_g_pad(ng))
        has = z > 0
        dl = torch.where(has, r / torch.where(has, z, torch.ones_like(z)), torch.zeros_like(z)).contiguous()
        dgate = dl
        row_shift, mult_arg = shift, mult
    else:
        o = out.float()
        if epi is not None:
            o = o - _epi_rows(prep, epi, out.shape[-2] if not prep.varlen else 0)
        dl = (dout.float() * o).sum(-1)
        if dlse is not None:  # d lse_i / d s_ij = P_ij folds into D: dS = P (M dP - (D - dlse))
            dl = dl - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(dlse.float()))
        dl = dl.contiguous()
        row_shift, mult_arg = lse, None
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    views = [View.of(t, prep.varlen) for t in (dq, dk, dv)]
    prep.launch(K.attn_bwd_dkdv, prep.grid("k"), do_view, views[1], views[2], row_shift, dl, mult_arg, ng, by="k",
                FIXED=fixed, G_PAD=_g_pad(ng))
    prep.launch(K.attn_bwd_dq, prep.grid("q"), do_view, views[0], row_shift, dl, mult_arg, ng, FIXED=fixed,
                G_PAD=_g_pad(ng))
    if epi is None:
        depi = _none(dev)
    elif prep.varlen:
        depi = torch.zeros(prep.batch, prep.heads, prep.head_dim, dtype=torch.float32, device=dev)
        depi.index_add_(0, prep.layout.seg_q, dout.float())
    else:
        depi = dout.float().sum(2)
    return dq, dk, dv, depi, dgate


@torch.library.custom_op("vlm::triton_attn_fwd", mutates_args=())
def triton_attn_fwd(q: Tensor, k: Tensor, v: Tensor, epi: Optional[Tensor], gate: Optional[Tensor],
                    cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor],
                    qg: Optional[Tensor], kg: Optional[Tensor], allow: Optional[Tensor],
                    row_subset: Optional[Tensor], probe_rows: Optional[Tensor], causal: bool,
                    subset_group: int, mode: str, gate_value: float, topk: int, scale: float,
                    num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward op: ``(out, lse, probes, topk thresholds, shift, c_g, Z_g)``; unused ones are empty."""
    return _fwd_impl(q, k, v, epi, gate, cu_q, cu_k, klen, qg, kg, allow, row_subset, probe_rows, causal,
                     subset_group, mode, gate_value, topk, scale, num_groups)


def _aux_shape_of(q: Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[0], q.shape[1]) if varlen else (q.shape[0], q.shape[1], q.shape[2])


@triton_attn_fwd.register_fake
def _(q, k, v, epi, gate, cu_q, cu_k, klen, qg, kg, allow, row_subset, probe_rows, causal, subset_group, mode,
      gate_value, topk, scale, num_groups):
    varlen = cu_q is not None
    aux = _aux_shape_of(q, varlen)
    f32 = dict(dtype=torch.float32, device=q.device)
    def none() -> Tensor:
        return q.new_empty(0, dtype=torch.float32)

    if probe_rows is None:
        probes = none()
    elif varlen:
        probes = q.new_empty(q.shape[1], probe_rows.shape[0], k.shape[0], **f32)
    else:
        probes = q.new_empty(q.shape[0], q.shape[1], probe_rows.shape[0], k.shape[2], **f32)
    nk = k.shape[0] if varlen else k.shape[2]
    thr = q.new_empty(aux, **f32) if 0 < topk < nk else none()
    fixed = mode == "fixed"
    shift = q.new_empty(aux, **f32) if fixed else none()
    mult = q.new_empty(*aux, num_groups, **f32) if fixed else none()
    z = q.new_empty(*aux, num_groups, **f32) if fixed else none()
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(aux, **f32), probes, thr, shift, mult, z


@torch.library.custom_op("vlm::triton_attn_bwd", mutates_args=())
def triton_attn_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                    lse: Tensor, thr: Tensor, shift: Tensor, mult: Tensor, z: Tensor, epi: Optional[Tensor],
                    cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor],
                    qg: Optional[Tensor], kg: Optional[Tensor], allow: Optional[Tensor],
                    row_subset: Optional[Tensor], causal: bool, subset_group: int, mode: str, topk: int,
                    scale: float, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward op: ``(dq, dk, dv, d epilogue [B, H, D] fp32, d gate per (row, group) fp32)``."""
    return _bwd_impl(dout, dlse, q, k, v, out, lse, thr, shift, mult, z, epi, cu_q, cu_k, klen, qg, kg, allow,
                     row_subset, causal, subset_group, mode, topk, scale, num_groups)


@triton_attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, thr, shift, mult, z, epi, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal,
      subset_group, mode, topk, scale, num_groups):
    depi = q.new_empty(0, dtype=torch.float32) if epi is None else q.new_empty(epi.shape, dtype=torch.float32)
    dgate = z.new_empty(z.shape) if mode == "fixed" else q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), depi, dgate)
