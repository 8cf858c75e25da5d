"""Host side of the fused attention: argument preparation, launches, and the two custom ops.

``prepare`` turns an attention call into the flat argument block every kernel in
``triton_attn_kernels.py`` shares (contiguous q/k/v, strides, int32 group ids, subset ranks, the
per-tile class table). ``vlm::triton_attn_fwd`` and ``vlm::triton_attn_bwd`` wrap the launches as
``torch.library`` custom ops with shape-only fake implementations, so ``torch.compile`` sees each
as one opaque node (no graph break inside; the host-side ``.item()``/``.tolist()`` calls here are
invisible to the tracer).

Options shared by both ops (all plain Python values): ``causal``; ``subset_group`` (-1: none);
``mode`` = ``"softmax"`` (also DPL's exact gate, which is softmax), ``"all_keys"`` or ``"fixed"``
(segmented with a given gate); ``gate_value`` (the float gate when no gate tensor is given);
``topk`` (0: none); ``scale``; ``num_groups`` (key groups of the fixed gate, else 0).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
import triton
from torch import Tensor

from vlm.kernels import triton_attn_kernels as K

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
    """Everything the launches need for one call (built per call, never traced)."""

    q: Tensor
    k: Tensor
    v: Tensor
    varlen: bool
    batch: int
    heads: int
    head_dim: int
    max_nq: int
    max_nk: int
    aux_shape: tuple[int, ...]
    common: list[Any]
    flags: dict[str, Any]
    block_m: int
    block_n: int
    seg_q: Optional[Tensor]  # varlen: sequence id of every packed query row
    thr: Tensor  # per-row top-k threshold (1-element dummy without top-k)

    def launch(self, kernel, grid, *extra, **constexprs) -> None:
        """Launch ``kernel`` with the shared argument block, ``extra`` runtime args, constexprs."""
        if any(g == 0 for g in grid):
            return
        warps, stages = launch_config(self.block_m, self.block_n, self.head_dim)
        kwargs = dict(**self.flags, **constexprs, num_warps=warps, num_stages=stages)
        LAUNCHER(kernel, tuple(grid), (*self.common, *extra), kwargs)


def launch_config(block_m: int, block_n: int, head_dim: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of every kernel of one call.

    One value for all kernels of a call: top-k compares logits of different kernels bit for bit,
    so they must be computed by the same MMA layout. ``d = 128`` tiles take 8 warps, which keeps
    the fp32 accumulator and the masked forward within the register file (4 warps spill there).
    """
    warps = 8 if block_m * head_dim >= 64 * 128 else 4
    stages = 1 if block_n * head_dim > 16384 else 2
    return warps, stages


def launch_on_device(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """The default :data:`LAUNCHER`: compile (cached) and run ``kernel`` on the current device."""
    kernel[grid](*args, **kwargs)


#: Every kernel launch of this module goes through this callable ``(kernel, grid, args, kwargs)``.
#: ``vlm.kernels.offline_compile`` swaps in a recorder to compile the exact specialisations for a
#: GPU target without one.
LAUNCHER = launch_on_device


def _dummy(ref: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(1, dtype=dtype, device=ref.device)


def _padded_per_seq(packed: Tensor, cu: Tensor, max_n: int) -> Tensor:
    """``[T]`` packed ids -> ``[B, max_n]`` per-sequence rows, -1 past each sequence's end."""
    lens = (cu[1:] - cu[:-1]).long()
    idx = cu[:-1].long()[:, None] + torch.arange(max_n, device=cu.device)[None, :]
    valid = torch.arange(max_n, device=cu.device)[None, :] < lens[:, None]
    gathered = packed.long()[idx.clamp(max=max(packed.numel() - 1, 0))] if packed.numel() else idx * 0
    return torch.where(valid, gathered, torch.full_like(idx, -1))


def _subset_rank(kg: Tensor, subset_group: int, cu_k: Optional[Tensor]) -> Tensor:
    """Rank of each key inside ``subset_group`` (in key order, per sequence); -1 elsewhere."""
    in_group = (kg.long() == subset_group).long()
    excl = in_group.cumsum(-1) - in_group
    if cu_k is not None:  # restart the count at each packed sequence
        lens = (cu_k[1:] - cu_k[:-1]).long()
        starts = cu_k[:-1].long().clamp(max=max(kg.numel() - 1, 0))
        base = torch.where(lens > 0, excl[starts], torch.zeros_like(lens))
        excl = excl - torch.repeat_interleave(base, lens, output_size=kg.numel())
    return torch.where(in_group.bool(), excl, torch.full_like(excl, -1)).to(torch.int32)


#: Most key groups an ``allow`` matrix may have (its rows become two 32-bit words).
MAX_KEY_GROUPS = 64


def allow_bits(allow: Tensor) -> Tensor:
    """``[Gq, Gk]`` bool -> int32 ``[Gq, 2]``: bit ``c % 32`` of word ``c // 32`` is ``allow[:, c]``."""
    gq, gk = allow.shape
    bits = torch.nn.functional.pad(allow.bool(), (0, MAX_KEY_GROUPS - gk)).view(gq, 2, 32).long()
    words = (bits << torch.arange(32, device=allow.device)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def _tile_table(qg: Tensor, kg: Tensor, kr: Optional[Tensor], allow: Optional[Tensor], bm: int,
                bn: int) -> Tensor:
    """Per-tile class ``[Bt, ceil(Nq/bm), ceil(Nk/bn)]`` int8: 0 empty, 1 mixed, 2 full.

    A tile's query groups ``A`` and key groups ``C`` (presence, -1 = no token) give: empty iff no
    ``allow[a, c]`` is true, full iff none is false and no key of the tile is in the
    ``row_subset`` group. Extra groups only make a tile more "mixed", so padding is harmless.
    """
    def presence(g: Tensor, block: int, num: int) -> Tensor:
        n = g.shape[-1]
        tiles = triton.cdiv(max(n, 1), block)
        g = torch.nn.functional.pad(g, (0, tiles * block - n), value=-1)
        hot = torch.nn.functional.one_hot(g.clamp(min=0), num) * (g >= 0)[..., None]
        return hot.view(g.shape[0], tiles, block, num).amax(2).float()

    bt = max(qg.shape[0], kg.shape[0])
    if allow is not None:
        pq = presence(qg, bm, allow.shape[0]).expand(bt, -1, -1)
        pk = presence(kg, bn, allow.shape[1]).expand(bt, -1, -1)
        any_ok = torch.einsum("bia,ac,bjc->bij", pq, allow.float(), pk) > 0
        any_no = torch.einsum("bia,ac,bjc->bij", pq, (~allow.bool()).float(), pk) > 0
    else:
        tq = triton.cdiv(max(qg.shape[-1], 1), bm)
        tk = triton.cdiv(max(kg.shape[-1], 1), bn)
        any_ok = torch.ones(bt, tq, tk, dtype=torch.bool, device=qg.device)
        any_no = torch.zeros_like(any_ok)
    if kr is not None:
        sub = presence(torch.where(kr >= 0, 0, -1), bn, 1)[..., 0] > 0  # tile holds subset keys
        any_no = any_no | sub.expand(bt, -1)[:, None, :]
    cls = torch.where(any_ok, torch.where(any_no, 1, 2), 0)
    return cls.to(torch.int8).contiguous()


def prepare(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
            klen: Optional[Tensor], qg: Optional[Tensor], kg: Optional[Tensor], allow: Optional[Tensor],
            row_subset: Optional[Tensor], causal: bool, subset_group: int, mode: str, topk: int,
            scale: float, thr: Optional[Tensor] = None) -> Prepared:
    """Build the shared argument block of one call (see ``triton_attn_kernels`` docstring)."""
    varlen = cu_q is not None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dev = q.device
    i32 = torch.int32
    if varlen:
        tq, heads, d = q.shape
        tk = k.shape[0]
        batch = cu_q.numel() - 1
        cu_q, cu_k = cu_q.to(device=dev, dtype=i32).contiguous(), cu_k.to(device=dev, dtype=i32).contiguous()
        max_nq = int((cu_q[1:] - cu_q[:-1]).max()) if batch > 0 else 0
        max_nk = int((cu_k[1:] - cu_k[:-1]).max()) if batch > 0 else 0
        nq_arg, nk_arg = max_nq, max_nk
        q_str = (0, d, heads * d)
        k_str = (0, d, heads * d)
        a_str = (0, 1, heads)
        aux_shape: tuple[int, ...] = (tq, heads)
        seg_q = torch.repeat_interleave(torch.arange(batch, device=dev), (cu_q[1:] - cu_q[:-1]).long(),
                                        output_size=tq)
    else:
        batch, heads, nq_arg, d = q.shape
        nk_arg = k.shape[2]
        max_nq, max_nk = nq_arg, nk_arg
        q_str = (heads * nq_arg * d, nq_arg * d, d)
        k_str = (heads * nk_arg * d, nk_arg * d, d)
        a_str = (heads * nq_arg, nq_arg, 1)
        aux_shape = (batch, heads, nq_arg)
        seg_q = None
    use_topk = topk > 0 and topk < max_nk
    topk_w = topk_block(topk) if use_topk else 0
    bn = BLOCK_N
    bm = BLOCK_M
    if topk_w > 128:  # the threshold pass keeps a [bm, topk_w] list in registers
        bm = min(bm, 32)
    elif mode == "fixed":  # per-(row, group) multipliers and the gate's extra terms: more live tiles
        bm = min(bm, 32 if d <= 64 else 16)
    has_allow = allow is not None
    has_subset = row_subset is not None
    has_kg = kg is not None and (has_allow or mode == "fixed")

    def groups(g: Optional[Tensor]) -> tuple[Tensor, int]:
        if g is None:
            return _dummy(q, i32), 0
        g = g.to(device=dev, dtype=i32).contiguous()
        return g, (g.shape[-1] if g.dim() == 2 and g.shape[0] > 1 else 0)

    qg_t, g_qsb = groups(qg)
    kg_t, g_ksb = groups(kg)
    if qg is not None and kg is not None and g_qsb != 0 and g_ksb == 0:
        kg_t, g_ksb = kg_t.expand(batch, -1).contiguous(), kg_t.shape[-1]
    kr = _subset_rank(kg_t, subset_group, cu_k) if has_subset else None
    if has_subset:
        rs = row_subset.to(device=dev, dtype=torch.int64)
        words = rs.shape[-1] if rs.dim() == (2 if varlen else 3) else 1
        rs = rs.reshape(*rs.shape[: (1 if varlen else 2)], words).contiguous()
        rs_sb = 0 if varlen or rs.shape[0] == 1 else rs.shape[1] * words
        rs_sn = words
    else:
        rs, rs_sb, rs_sn = _dummy(q, torch.int64), 0, 0
    allow_t = allow_bits(allow.to(dev)) if has_allow else _dummy(q, i32)
    has_table = has_allow or has_subset
    if has_table:
        if varlen:
            qg_b = _padded_per_seq(qg_t, cu_q, max_nq)
            kg_b = _padded_per_seq(kg_t, cu_k, max_nk)
            kr_b = _padded_per_seq(kr, cu_k, max_nk) if kr is not None else None
        else:
            qg_b = qg_t.long().reshape(-1, nq_arg)
            kg_b = kg_t.long().reshape(-1, nk_arg)
            kr_b = kr.long().reshape(-1, nk_arg) if kr is not None else None
        tab = _tile_table(qg_b, kg_b, kr_b, allow.to(dev) if has_allow else None, bm, bn)
        tab_str = (0 if tab.shape[0] == 1 else tab.shape[1] * tab.shape[2], tab.shape[2], 1)
    else:
        tab, tab_str = _dummy(q, torch.int8), (0, 0, 0)
    klen_t = klen.to(device=dev, dtype=torch.int64).contiguous() if klen is not None else _dummy(q, torch.int64)
    compute_thr = use_topk and (thr is None or thr.numel() == 0)
    if compute_thr:
        thr = torch.empty(aux_shape, dtype=torch.float32, device=dev)
    elif not use_topk:
        thr = _dummy(q, torch.float32)
    common: list[Any] = [
        q, k, v, *q_str, *k_str, *a_str,
        cu_q if varlen else _dummy(q, i32), cu_k if varlen else _dummy(q, i32), klen_t,
        qg_t, kg_t, kr if kr is not None else _dummy(q, i32), g_qsb, g_ksb,
        allow_t, rs, rs_sb, rs_sn, tab, *tab_str, thr,
        heads, nq_arg, nk_arg, float(scale),
    ]
    upcast = INTERPRET and q.dtype in (torch.float16, torch.bfloat16)
    flags = dict(
        VARLEN=varlen, HAS_KLEN=klen is not None, CAUSAL=bool(causal), HAS_ALLOW=has_allow,
        HAS_SUBSET=has_subset, HAS_TABLE=has_table, ALL_KEYS=mode == "all_keys", HAS_TOPK=use_topk,
        HAS_KG=has_kg, BLOCK_M=bm, BLOCK_N=bn, HEAD_D=d, UPCAST=upcast, DOT=dot_precision(q.dtype),
    )
    prep = Prepared(q, k, v, varlen, batch, heads, d, max_nq, max_nk, aux_shape, common, flags, bm, bn, seg_q, thr)
    if compute_thr:
        prep.launch(K.attn_topk_threshold, (triton.cdiv(max_nq, bm), batch * heads), topk, SORT=TOPK_SORT,
                    TOPK_W=topk_w)
    return prep


def _aux_empty(prep: Prepared, *tail: int) -> Tensor:
    return torch.empty(*prep.aux_shape, *tail, dtype=torch.float32, device=prep.q.device)


def _g_pad(num_groups: int) -> int:
    return max(16, triton.next_power_of_2(num_groups))


def _epi_rows(prep: Prepared, epi: Tensor, nq: int) -> Tensor:
    """``epilogue_add`` broadcast to the output layout (fp32)."""
    epi = epi.float()
    if prep.varlen:
        return epi[prep.seg_q]  # [Tq, H, D]
    return epi[:, :, None, :].expand(-1, -1, nq, -1)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, epi: Optional[Tensor], gate: Optional[Tensor],
              cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor], qg: Optional[Tensor],
              kg: Optional[Tensor], allow: Optional[Tensor], row_subset: Optional[Tensor],
              probe_rows: Optional[Tensor], causal: bool, subset_group: int, mode: str, gate_value: float,
              topk: int, scale: float, num_groups: int) -> tuple[Tensor, ...]:
    prep = prepare(q, k, v, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal, subset_group, mode, topk, scale)
    dev = q.device
    bh = prep.batch * prep.heads
    grid_m = (triton.cdiv(prep.max_nq, prep.block_m), bh)
    out = torch.empty_like(prep.q)
    lse = _aux_empty(prep)
    def none() -> Tensor:  # a fresh empty tensor per unused output (outputs must not alias)
        return torch.empty(0, dtype=torch.float32, device=dev)

    shift, mult, z = none(), none(), none()
    ng = 0
    fixed = mode == "fixed"
    if fixed:
        ng = num_groups
        shift = _aux_empty(prep)
        z = torch.zeros(*prep.aux_shape, ng, dtype=torch.float32, device=dev)
        prep.launch(K.attn_group_sums, grid_m, shift, z, prep.q, ng, WITH_DO=False, G_PAD=_g_pad(ng))
        g = gate.float() if gate is not None else torch.tensor(gate_value, dtype=torch.float32, device=dev)
        g = g.reshape(()) if prep.varlen else g
        g = g.expand(*prep.aux_shape, ng)
        has = z > 0
        mult = torch.where(has, g / torch.where(has, z, torch.ones_like(z)), torch.zeros_like(z)).contiguous()
        total = z.sum(-1)
        lse = torch.where(total > 0, shift + torch.log(torch.where(total > 0, total, torch.ones_like(total))),
                          torch.full_like(total, float("-inf")))
    epi_t = epi.contiguous() if epi is not None else _dummy(q, q.dtype)
    prep.launch(K.attn_fwd, grid_m, out, lse, epi_t, shift if fixed else lse, mult if fixed else lse, ng,
                FIXED=fixed, HAS_EPI=epi is not None, G_PAD=_g_pad(ng))
    probes = none()
    if probe_rows is not None:
        p = probe_rows.numel()
        rows = probe_rows.to(device=dev, dtype=torch.int64).contiguous()
        if prep.varlen:
            tk = k.shape[0]
            probes = torch.zeros(prep.heads, p, tk, dtype=torch.float32, device=dev)
            p_str = (0, p * tk, tk)
        else:
            nk = k.shape[2]
            probes = torch.zeros(prep.batch, prep.heads, p, nk, dtype=torch.float32, device=dev)
            p_str = (prep.heads * p * nk, p * nk, nk)
        grid = (triton.cdiv(prep.max_nk, prep.block_n), bh, triton.cdiv(p, prep.block_m))
        prep.launch(K.attn_probes, grid, probes, rows, p, *p_str, shift if fixed else lse,
                    mult if fixed else lse, ng, FIXED=fixed)
    total_k = k.shape[0] if prep.varlen else k.shape[2]
    if prep.flags["HAS_TOPK"]:
        thr = prep.thr
    elif 0 < topk < total_k:  # k >= every sequence's length: top-k keeps all, threshold -inf
        thr = torch.full(prep.aux_shape, float("-inf"), dtype=torch.float32, device=dev)
    else:
        thr = none()
    return out, lse, probes, thr, shift, mult, z


def _bwd_impl(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              thr: Tensor, shift: Tensor, mult: Tensor, z: Tensor, epi: Optional[Tensor], cu_q: Optional[Tensor],
              cu_k: Optional[Tensor], klen: Optional[Tensor], qg: Optional[Tensor], kg: Optional[Tensor],
              allow: Optional[Tensor], row_subset: Optional[Tensor], causal: bool, subset_group: int,
              mode: str, topk: int, scale: float, num_groups: int) -> tuple[Tensor, ...]:
    prep = prepare(q, k, v, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal, subset_group, mode, topk, scale,
                   thr)
    dev = q.device
    bh = prep.batch * prep.heads
    dout = dout.contiguous()
    fixed = mode == "fixed"
    ng = num_groups if fixed else 0
    dgate = torch.empty(0, dtype=torch.float32, device=dev)
    if fixed:
        r = torch.zeros(*prep.aux_shape, ng, dtype=torch.float32, device=dev)
        prep.launch(K.attn_group_sums, (triton.cdiv(prep.max_nq, prep.block_m), bh), shift, r, dout, ng,
                    WITH_DO=True, G_PAD=_g_pad(ng))
        has = z > 0
        dl = torch.where(has, r / torch.where(has, z, torch.ones_like(z)), torch.zeros_like(z)).contiguous()
        dgate = dl
        row_shift = shift
    else:
        o = out.float()
        if epi is not None:
            o = o - _epi_rows(prep, epi, out.shape[-2] if not prep.varlen else 0)
        dl = (dout.float() * o).sum(-1)
        if dlse is not None:  # d lse_i / d s_ij = P_ij folds into D: dS = P (M dP - (D - dlse))
            dl = dl - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(dlse.float()))
        dl = dl.contiguous()
        row_shift = lse
    dq = torch.empty_like(prep.q)
    dk = torch.empty_like(prep.k)
    dv = torch.empty_like(prep.v)
    mult_arg = mult if fixed else dl
    prep.launch(K.attn_bwd_dkdv, (triton.cdiv(prep.max_nk, prep.block_n), bh), dout, dk, dv, row_shift, dl,
                mult_arg, ng, FIXED=fixed, G_PAD=_g_pad(ng))
    prep.launch(K.attn_bwd_dq, (triton.cdiv(prep.max_nq, prep.block_m), bh), dout, dq, row_shift, dl,
                mult_arg, ng, FIXED=fixed, G_PAD=_g_pad(ng))
    if epi is None:
        depi = torch.empty(0, dtype=torch.float32, device=dev)
    elif prep.varlen:
        depi = torch.zeros(prep.batch, prep.heads, prep.head_dim, dtype=torch.float32, device=dev)
        depi.index_add_(0, prep.seg_q, dout.float())
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
