"""Triton device helpers shared by every masked-attention kernel: sequence bounds, masks, scores.

Each kernel program owns one ``BLOCK_M x BLOCK_N`` tile of logits at a time. These helpers
decide, for such a tile, which (query, key) pairs are in play:

* ``structural``: padding (``k_lengths``, varlen ends) and bottom-right aligned causality,
  ``j <= i + (Nk - Nq)``. These keys never enter any denominator.
* ``semantic``: the group ``allow`` matrix (one bit word pair per query group, so no N x N
  mask exists anywhere) and the ``row_subset`` bitmask: for a key of rank ``r`` inside
  ``subset_group``, bit ``r % 64`` of word ``r // 64`` of the query row's words decides.
* the per-tile class table built on the host from the groups present in each tile (0 = no pair
  allowed, 1 = mixed, 2 = every pair allowed) lets the kernels skip empty tiles. The semantic
  mask is evaluated on every tile that runs, without a branch on the class: with per-row loads
  only it costs a few integer ops per element, and such a branch kept more values live and
  yielded an i1 mask that compiled Triton could not put through shared memory (fp32 fixed gate
  + ``allow`` in ``attn_group_sums`` failed to compile).

``scores`` computes ``s = scale * q k^T`` with the *same* operand shapes in every kernel (the
query tile is always the left operand). That keeps the forward, the top-k threshold pass and the
backward bit-identical, which top-k's ``s >= threshold`` test relies on.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``DOT`` is the input precision of fp32 operands:
    ``"ieee"`` (full fp32 products, FMA units: slow, exact), ``"tf32"`` (tensor cores, 10-bit
    mantissa) or ``"tf32x3"`` (tensor cores, about fp32 accuracy). 16-bit operands ignore it."""
    return tl.dot(a, b, input_precision=DOT)


@triton.jit
def mm_onehot(a, b, DOT: tl.constexpr):
    """``a @ b`` where one operand is a 0/1 one-hot over groups (group sums, per-group values
    spread to keys): its products are exact, so only the other operand's rounding matters.
    ``"ieee"`` stays exact; otherwise 3xTF32 keeps about fp32 accuracy on tensor cores."""
    if DOT == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def per_key(rows, kg, G_PAD: tl.constexpr):
    """``rows [BLOCK_M, G_PAD]`` (one value per row and key group) spread to the keys of a tile,
    ``out[i, j] = rows[i, kg[j]]``: a gather between registers instead of a ``[BLOCK_M, BLOCK_N]``
    gather from memory, whose 64-bit addresses cost the fixed-gate forward its register budget."""
    idx = tl.zeros((rows.shape[0], kg.shape[0]), dtype=tl.int32) + tl.minimum(kg, G_PAD - 1)[None, :]
    return tl.gather(rows, idx, 1)


@triton.jit
def group_rows(Ptr, aux, row_ok, NG, G_PAD: tl.constexpr):
    """Load ``[BLOCK_M, G_PAD]`` per-(row, key group) values (``NG`` of them per row, 0 past)."""
    gcols = tl.arange(0, G_PAD)
    return tl.load(Ptr + aux[:, None] * NG + gcols[None, :], mask=row_ok[:, None] & (gcols[None, :] < NG),
                   other=0.0)


@triton.jit
def scores(q, k, scale, DOT: tl.constexpr):
    """Scaled logits ``s = scale * q @ k^T`` of one tile, fp32 ``[BLOCK_M, BLOCK_N]``."""
    return mm(q, tl.trans(k), DOT) * scale


@triton.jit
def program_tile(pid, NT, H):
    """Flat program id -> ``(tile, b, h)``: tiles of one (batch, head) are neighbours (they share
    its K/V in L2); ``b`` and ``h`` are int64 so that ``b * stride`` may pass 2^31. A flat grid
    axis allows 2^31 - 1 programs (the y/z axes stop at 65535)."""
    t = pid % NT
    bh = pid // NT
    return t, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def view_ptrs(X, b, h, r0, offs, HEAD_D: tl.constexpr):
    """Pointers ``[len(offs), HEAD_D]`` to rows ``r0 + offs`` of (batch ``b``, head ``h``) of a
    :class:`View` ``X``; the scalar base is int64, the in-tile offsets int32."""
    base = b * X.sb + h * X.sh + (r0 + b * 0) * X.sn
    return X.ptr + base + offs[:, None] * X.sn + tl.arange(0, HEAD_D)[None, :]


@triton.jit
def load_rows(ptrs, ok, MASKED: tl.constexpr):
    """The ``[rows, d]`` tile at ``ptrs``: rows where ``ok`` is False read 0 when ``MASKED``; a
    full tile loads with no mask, so the load is unconditional and the compiler can pipeline it."""
    if MASKED:
        x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def aux_index(b, h, r0, offs, H, NQ, VARLEN: tl.constexpr):
    """Index of rows ``r0 + offs`` in the per-row fp32 arrays (lse, thresholds, shifts):
    ``[B, H, NQ]`` padded, ``[Tq, H]`` packed."""
    if VARLEN:
        return (r0 + b * 0 + offs) * H + h
    else:
        return (b * H + h) * NQ + offs


@triton.jit
def seq_bounds(b, S, NQ, NK, VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr):
    """Start rows and lengths of sequence ``b``: ``(q0, nq, k0, nk, nk_eff)``.

    ``nk`` is the full key length (it fixes the causal diagonal), ``nk_eff`` additionally
    drops ``k_lengths`` padding.
    """
    if VARLEN:
        q0 = tl.load(S.cu_q + b)
        nq = tl.load(S.cu_q + b + 1) - q0
        k0 = tl.load(S.cu_k + b)
        nk = tl.load(S.cu_k + b + 1) - k0
    else:
        q0 = 0
        nq = NQ
        k0 = 0
        nk = NK
    nk_eff = nk
    if HAS_KLEN:
        nk_eff = tl.minimum(nk, tl.load(S.k_len + b).to(tl.int32))
    return q0, nq, k0, nk, nk_eff


@triton.jit
def query_program(S, H, NQ, NK, C):
    """Prologue of a program that owns one query tile of one (batch, head): ``(pid_m, n_m, b, h,
    q0, nq, k0, nk, nk_eff, offs_m, row_ok, aux)`` (tile, tile count, batch, head, sequence
    bounds, the tile's rows, which exist, and their index in the per-row arrays)."""
    n_m = tl.cdiv(NQ, C.BLOCK_M)
    pid_m, b, h = program_tile(tl.program_id(0), n_m, H)
    q0, nq, k0, nk, nk_eff = seq_bounds(b, S, NQ, NK, C.VARLEN, C.HAS_KLEN)
    offs_m = pid_m * C.BLOCK_M + tl.arange(0, C.BLOCK_M)
    return pid_m, n_m, b, h, q0, nq, k0, nk, nk_eff, offs_m, offs_m < nq, aux_index(b, h, q0, offs_m, H, NQ, C.VARLEN)


@triton.jit
def query_rows(Q, M, b, h, q0, offs_m, row_ok, aux, NQ, C):
    """A query tile and its per-row mask inputs: ``(q, qg, rs_rows, thr)``.

    ``qg`` the query group ids, ``rs_rows`` pointers to each row's first ``row_subset`` word,
    ``thr`` the top-k thresholds (``-inf`` where a row keeps all its keys).
    """
    q = load_rows(view_ptrs(Q, b, h, q0, offs_m, C.HEAD_D), row_ok, True)
    if C.UPCAST:
        q = q.to(tl.float32)
    qg = offs_m * 0
    if C.HAS_ALLOW:
        g_base = q0 + b * 0
        if C.QG_B:
            g_base += b * NQ
        qg = tl.load(M.qg + g_base + offs_m, mask=row_ok, other=0)
    rs_rows = offs_m * 0
    if C.HAS_SUBSET:
        r_base = q0 + b * 0
        if C.RS_B:
            r_base += b * NQ
        rs_rows = M.rs + (r_base + offs_m) * M.rs_sn
    thr = tl.zeros(offs_m.shape, dtype=tl.float32)
    if C.HAS_TOPK:
        thr = tl.load(M.thr + aux, mask=row_ok, other=float("-inf"))
    return q, qg, rs_rows, thr


@triton.jit
def key_tile(K, V, M, b, h, k0, start_n, nk_eff, NK, C, MASKED: tl.constexpr, WITH_V: tl.constexpr):
    """Keys (and values) of one key tile with their group ids and subset ranks:
    ``(offs_n, col_ok, k, v, kg, kr)``. A full tile (``MASKED`` off) loads without a mask, so the
    loads are unconditional and the compiler pipelines them."""
    offs_n = start_n + tl.arange(0, C.BLOCK_N)
    col_ok = offs_n < nk_eff
    k = load_rows(view_ptrs(K, b, h, k0, offs_n, C.HEAD_D), col_ok, MASKED)
    v = k
    if WITH_V:
        v = load_rows(view_ptrs(V, b, h, k0, offs_n, C.HEAD_D), col_ok, MASKED)
    if C.UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    g_base = k0 + b * 0
    if C.KG_B:
        g_base += b * NK
    kg = offs_n * 0
    if C.HAS_KG:
        kg = tl.load(M.kg + g_base + offs_n, mask=col_ok, other=0)
    kr = offs_n * 0 - 1
    if C.HAS_SUBSET:
        kr = tl.load(M.kr + g_base + offs_n, mask=col_ok, other=-1)
    return offs_n, col_ok, k, v, kg, kr


@triton.jit
def key_range_end(pid_m, nq, nk, nk_eff, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the keys query tile ``pid_m`` can see: ``nk_eff``, the causal diagonal of its last
    row (bottom-right aligned), 0 for a tile past the sequence."""
    hi = nk_eff
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + nk - nq)
    return tl.where(pid_m * BLOCK_M < nq, hi, 0)


@triton.jit
def tile_counts(T, b, t, n_outer, n_inner, TAB_B: tl.constexpr):
    """``(base, n_full, n_partial)`` of the compact tile list of outer tile ``t`` of batch ``b``."""
    row = t + b * 0
    if TAB_B:
        row += b * n_outer
    n_full = tl.load(T.cnt + row * 2)
    n_part = tl.load(T.cnt + row * 2 + 1)
    return row * n_inner, n_full, n_part


@triton.jit
def structural(offs_m, offs_n, nq, nk, nk_eff, CAUSAL: tl.constexpr):
    """Padding and causal mask of a tile (True = key is a candidate for the row)."""
    ok = (offs_m[:, None] < nq) & (offs_n[None, :] < nk_eff)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (nk - nq))
    return ok


@triton.jit
def semantic(
    qg, kg, kr, rs_rows, row_ok, col_ok, Allow,
    HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Group ``allow`` and ``row_subset`` mask of a tile, evaluated element by element.

    ``qg [BLOCK_M]``/``kg [BLOCK_N]`` are group ids, ``kr`` the key's rank inside
    ``subset_group`` (-1 outside it), ``rs_rows`` pointers to each row's first bitmask word.
    Only per-row (1-D) loads, no ``[BLOCK_M, BLOCK_N]`` gather: ``Allow`` holds each query
    group's allowed key groups as two int32 bit words (key groups 0-31, 32-63), and the subset
    ranks of one key tile are consecutive, so they span at most two ``row_subset`` words.
    Invalid rows/columns are not masked here (the structural mask does that).
    """
    sem = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    if HAS_ALLOW:
        lo = tl.load(Allow + 2 * qg, mask=row_ok, other=0)
        hi = tl.load(Allow + 2 * qg + 1, mask=row_ok, other=0)
        word = tl.where(kg[None, :] < 32, lo[:, None], hi[:, None])
        sem = sem & (((word >> (kg & 31)[None, :]) & 1) != 0)
    if HAS_SUBSET:
        tl.static_assert(BLOCK_N <= 64, "a key tile's subset ranks must span at most two words")
        has = tl.max(kr, 0) >= 0
        w0 = tl.where(has, tl.min(tl.where(kr >= 0, kr, 1 << 30), 0), 0) // 64
        w1 = tl.where(has, tl.max(kr, 0), 0) // 64
        first = tl.load(rs_rows + w0, mask=row_ok & has, other=0)
        second = tl.load(rs_rows + w1, mask=row_ok & (w1 > w0), other=0)
        r = tl.maximum(kr, 0)
        word = tl.where((r // 64 == w0)[None, :], first[:, None], second[:, None])
        bit = (word >> (r % 64).to(tl.int64)[None, :]) & 1
        sem = sem & ((kr[None, :] < 0) | (bit != 0))
    return sem


@triton.jit
def tile_masks(
    s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows, Allow,
    CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr,
    ALL_KEYS: tl.constexpr, HAS_TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``(denom, sem)`` of a tile.

    ``denom`` is the row's denominator set: structural & semantic (& top-k) for
    ``softmax``/``segmented``; structural (& top-k) for ``all_keys``, whose semantic mask ``sem``
    only zeroes weights after normalisation. Top-k keeps ``s >= thr`` (the row's k-th largest
    logit of its base set, ``-inf`` when the row has fewer than k keys). A full tile (``MASKED``
    off: inside every bound and every pair allowed) has constant-true masks, which fold away.
    """
    if MASKED:
        ok = structural(offs_m, offs_n, nq, nk, nk_eff, CAUSAL)
        sem = semantic(qg, kg, kr, rs_rows, row_ok, col_ok, Allow, HAS_ALLOW, HAS_SUBSET, BLOCK_M, BLOCK_N)
    else:
        ok = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
        sem = ok
    if ALL_KEYS:
        denom = ok
    else:
        denom = ok & sem
    if HAS_TOPK:
        denom = denom & (s >= thr[:, None])
    return denom, sem
