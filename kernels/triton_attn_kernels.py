"""Triton kernels of the fused masked attention (forward, top-k thresholds, segment sums, probes, backward).

All kernels take one argument block, ``Q, K, V, S, M, T, H, NQ, NK, scale`` (the bundles of
``triton_attn_args.py``), then their own outputs, then ``C`` (every constexpr switch):

* ``Q``/``K``/``V`` are :class:`View` s (pointer + strides per batch, head, row; head dim
  contiguous). Padded input is ``[B, H, N, D]``; packed varlen ``[T, H, D]`` has ``sb = 0`` and
  row ``q0 + i`` with ``q0 = cu_seqlens[b]``.
* per-row auxiliaries (lse, top-k threshold, shift, D) are ``[B, H, Nq]`` padded, ``[Tq, H]``
  varlen (``aux_index``); per-(row, key group) arrays append a trailing ``NG`` axis.
* ``M`` holds the group ids, the subset ranks (rank of a key inside ``subset_group``, -1
  outside), the ``allow`` matrix as two int32 bit words per query group and the ``row_subset``
  words; ``T`` the compact tile lists: per query tile (per key tile for ``dK/dV``) the full tiles,
  which run without a mask, then the partial ones. Empty tiles are not listed at all.

Every program is one tile of one (batch, head) on a flat grid (``program_tile``).

Notation: ``s = scale q k^T``; ``lse_i = log sum_{j in denom(i)} e^{s_ij}``;
``P_ij = e^{s_ij - lse_i}`` on the denominator set. Exponentials are base 2
(``e^x = 2^{x log2 e}``).

Forward (online softmax, FlashAttention-2): per key tile, ``m' = max(m, rowmax s)``,
``l <- l e^{m-m'} + rowsum e^{s-m'}``, ``acc <- acc e^{m-m'} + (M ⊙ e^{s-m'}) V`` where ``M`` is the
weight mask (the semantic mask under ``all_keys``, the denominator set otherwise);
``O = acc / l (+ epilogue)``, ``lse = m + log l``.

Segmented with a fixed gate runs in two passes: ``attn_group_sums`` gives the row max ``m``
and ``Z_g = sum_{j in g} e^{s_j - m}``; the host forms ``c_g = gate_g / Z_g``; the forward then
accumulates ``O = sum_j e^{s_j - m} c_{g(j)} v_j`` (``FIXED``).

Backward: ``dP = dO V^T``, ``dV = (M ⊙ P)^T dO``, ``dS = P ⊙ (M ⊙ dP - D)``, ``dQ = scale dS K``,
``dK = scale dS^T Q``, with ``D_i = sum_j M_ij P_ij dP_ij = dO_i · (O_i - epilogue)``. Under
``all_keys`` ``P`` is the all-key softmax and the normaliser's gradient is the ``- D`` term. For the
fixed gate ``D`` is per key group, ``D_g = sum_{j in g} (e^{s_j - m}/Z_g) dP_j``, from
``attn_group_sums(WITH_DO)``, and it is also ``d gate_g``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vlm.kernels.triton_attn_masks import (aux_index, group_rows, key_range_end, key_tile, load_rows, mm, mm_onehot,
                                           per_key, program_tile, query_program, query_rows, scores, seq_bounds,
                                           tile_counts, tile_masks, view_ptrs)

#: ``log2(e)``. Bound as a ``tl.constexpr`` *object*: compiled Triton rejects plain (or merely
#: annotated) module globals inside ``@triton.jit`` code; the interpreter never checks.
LOG2E = tl.constexpr(1.4426950408889634)

#: Scalar sizes: not specialised on ``== 1`` / divisibility by 16, so a new sequence length, head
#: count or group count reuses the compiled kernel instead of compiling another variant.
_SIZES = ["H", "NQ", "NK", "NG"]


@triton.jit
def _online_softmax_step(s, denom, m_i):
    """One tile of the online softmax: the new row max ``m'``, the rescale ``e^{m - m'}`` of what
    was accumulated, and ``p = e^{s - m'}`` on the denominator set (0 elsewhere; a row with no
    key yet keeps ``m' = -inf`` and shifts by 0)."""
    s_m = tl.where(denom, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s_m, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2((m_i - m_safe) * LOG2E), tl.exp2((s_m - m_safe[:, None]) * LOG2E)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, qg, rs_rows, thr, shift, cmat, offs_m, row_ok, start_n, b, h, k0, nq, nk,
              nk_eff, K, V, M, NK, scale, C, MASKED: tl.constexpr):
    """One key tile of the forward: update ``(acc, m_i, l_i)``."""
    offs_n, col_ok, k, v, kg, kr = key_tile(K, V, M, b, h, k0, start_n, nk_eff, NK, C, MASKED, True)
    s = scores(q, k, scale, C.DOT)
    denom, sem = tile_masks(s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows,
                            M.allow, C.CAUSAL, C.HAS_ALLOW, C.HAS_SUBSET, C.ALL_KEYS, C.HAS_TOPK, C.BLOCK_M,
                            C.BLOCK_N, MASKED)
    if C.FIXED:
        p = tl.where(denom, tl.exp2((s - shift[:, None]) * LOG2E) * per_key(cmat, kg, C.G_PAD), 0.0)
        acc += mm(p.to(v.dtype), v, C.DOT)
    else:
        m_new, alpha, p = _online_softmax_step(s, denom, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        if C.ALL_KEYS:
            p = tl.where(sem, p, 0.0)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, C.DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_SIZES)
def attn_fwd(Q, K, V, S, M, T, H, NQ, NK, scale, O, Lse, Epi, Shift, Mult, NG, C):
    """Forward: one program per (query tile, batch x head). Writes ``O`` and (unless ``FIXED``) ``Lse``."""
    pid_m, n_m, b, h, q0, nq, k0, nk, nk_eff, offs_m, row_ok, aux = query_program(S, H, NQ, NK, C)
    q, qg, rs_rows, thr = query_rows(Q, M, b, h, q0, offs_m, row_ok, aux, NQ, C)
    shift = tl.zeros([C.BLOCK_M], dtype=tl.float32)
    cmat = tl.zeros([C.BLOCK_M, C.G_PAD], dtype=tl.float32)
    if C.FIXED:
        shift = tl.load(Shift + aux, mask=row_ok, other=float("-inf"))
        shift = tl.where(shift == float("-inf"), 0.0, shift)
        cmat = group_rows(Mult, aux, row_ok, NG, C.G_PAD)
    m_i = tl.full([C.BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([C.BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([C.BLOCK_M, C.HEAD_D], dtype=tl.float32)
    base, n_full, n_part = tile_counts(T, b, pid_m, n_m, tl.cdiv(NK, C.BLOCK_N), C.TAB_B)
    for i in range(0, n_full):
        start_n = tl.load(T.lst + base + i) * C.BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qg, rs_rows, thr, shift, cmat, offs_m, row_ok, start_n, b, h,
                                  k0, nq, nk, nk_eff, K, V, M, NK, scale, C, False)
    for i in range(n_full, n_full + n_part):
        start_n = tl.load(T.lst + base + i) * C.BLOCK_N
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qg, rs_rows, thr, shift, cmat, offs_m, row_ok, start_n, b, h,
                                  k0, nq, nk, nk_eff, K, V, M, NK, scale, C, True)
    if C.FIXED:
        out = acc
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(Lse + aux, lse, mask=row_ok)
    if C.HAS_EPI:
        out += tl.load(Epi + (b * H + h) * C.HEAD_D + tl.arange(0, C.HEAD_D)).to(tl.float32)[None, :]
    tl.store(view_ptrs(O, b, h, q0, offs_m, C.HEAD_D), out.to(O.ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_topk_by_rank(buf, tile, TOPK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sorted (descending) top-``TOPK_W`` of ``buf ∪ tile`` by explicit ranks (interpreter path).

    ``buf [BLOCK_M, TOPK_W]`` is sorted descending, so its own rank is its index; ties go to
    ``buf`` first, then to the lower tile index, which makes every rank unique. Position ``r`` of
    the result takes the element of rank ``r``. Same result as :func:`_merge_topk_by_sort`, with
    ``[BLOCK_M, TOPK_W, TOPK_W]`` temporaries: far too large for GPU registers and far faster
    than ``tl.sort`` under the interpreter.
    """
    iw = tl.arange(0, TOPK_W)
    it = tl.arange(0, BLOCK_N)
    rank_a = iw[None, :] + tl.sum((tile[:, None, :] > buf[:, :, None]).to(tl.int32), 2)
    earlier = it[None, :] < it[:, None]  # [i, j]: j before i
    beats_b = (tile[:, None, :] > tile[:, :, None]) | ((tile[:, None, :] == tile[:, :, None]) & earlier[None, :, :])
    rank_b = tl.sum((buf[:, None, :] >= tile[:, :, None]).to(tl.int32), 2) + tl.sum(beats_b.to(tl.int32), 2)
    new_a = tl.max(tl.where(rank_a[:, None, :] == iw[None, :, None], buf[:, None, :], float("-inf")), 2)
    new_b = tl.max(tl.where(rank_b[:, None, :] == iw[None, :, None], tile[:, None, :], float("-inf")), 2)
    return tl.maximum(new_a, new_b)


@triton.jit
def _merge_topk_by_sort(buf, tile, BLOCK_M: tl.constexpr, TOPK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sorted (descending) top-``TOPK_W`` of ``buf ∪ tile`` with sorting networks (GPU path).

    The tile is sorted ascending and placed at the end of a ``TOPK_W``-wide row of ``-inf``;
    ``max(buf_desc, that)`` holds exactly the ``TOPK_W`` largest of the union and is a bitonic
    sequence (bitonic half-cleaner), so a bitonic *merge* (``log2 TOPK_W`` compare-exchange
    stages, not a full sort) orders it. Only the ``BLOCK_N``-wide tile is fully sorted: a wide
    top-k no longer widens the key tile, and the code stays small enough to compile quickly.
    """
    tile = tl.sort(tile, descending=False)
    if TOPK_W > BLOCK_N:
        chunks: tl.constexpr = TOPK_W // BLOCK_N
        b3 = tl.reshape(buf, (BLOCK_M, chunks, BLOCK_N))
        last = tl.arange(0, chunks)[None, :, None] == chunks - 1
        b3 = tl.maximum(b3, tl.where(last, tile[:, None, :], float("-inf")))
        merged = tl.reshape(b3, (BLOCK_M, TOPK_W))
    else:
        merged = tl.maximum(buf, tile)
    return tl.bitonic_merge(merged, descending=True)


@triton.jit
def _topk_tile(buf, q, qg, rs_rows, offs_m, row_ok, start_n, b, h, k0, nq, nk, nk_eff, K, V, M, NK, scale, C,
               MASKED: tl.constexpr):
    """Merge one key tile's base-set logits into the running top-``TOPK_W`` list ``buf``."""
    offs_n, col_ok, k, v, kg, kr = key_tile(K, V, M, b, h, k0, start_n, nk_eff, NK, C, MASKED, False)
    s = scores(q, k, scale, C.DOT)
    base, sem = tile_masks(s, s, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows, M.allow,
                           C.CAUSAL, C.HAS_ALLOW, C.HAS_SUBSET, C.ALL_KEYS, False, C.BLOCK_M, C.BLOCK_N, MASKED)
    tile = tl.where(base, s, float("-inf"))
    if C.SORT:
        buf = _merge_topk_by_sort(buf, tile, C.BLOCK_M, C.TOPK_W, C.BLOCK_N)
    else:
        buf = _merge_topk_by_rank(buf, tile, C.TOPK_W, C.BLOCK_N)
    return buf


@triton.jit(do_not_specialize=_SIZES + ["TOPK"])
def attn_topk_threshold(Q, K, V, S, M, T, H, NQ, NK, scale, TOPK, C):
    """Top-k pass 1: each row's k-th largest logit over its base set (``-inf`` if fewer keys).

    Logits come in the same ``BLOCK_M x BLOCK_N`` tiles as in the attention passes (bit-exact
    ``s >= threshold`` there). A running top-``TOPK_W`` list per row (``TOPK_W >= k``, a power of
    two, at least ``BLOCK_N``), sorted descending, is merged with each tile: by sorting networks
    when ``SORT`` (GPU), else by ranks (interpreter, where ``tl.sort`` costs seconds).
    """
    pid_m, n_m, b, h, q0, nq, k0, nk, nk_eff, offs_m, row_ok, aux = query_program(S, H, NQ, NK, C)
    q, qg, rs_rows, thr = query_rows(Q, M, b, h, q0, offs_m, row_ok, aux, NQ, C)  # C.HAS_TOPK is off here
    buf = tl.full([C.BLOCK_M, C.TOPK_W], float("-inf"), dtype=tl.float32)
    base, n_full, n_part = tile_counts(T, b, pid_m, n_m, tl.cdiv(NK, C.BLOCK_N), C.TAB_B)
    for i in range(0, n_full):
        start_n = tl.load(T.lst + base + i) * C.BLOCK_N
        buf = _topk_tile(buf, q, qg, rs_rows, offs_m, row_ok, start_n, b, h, k0, nq, nk, nk_eff, K, V, M, NK,
                         scale, C, False)
    for i in range(n_full, n_full + n_part):
        start_n = tl.load(T.lst + base + i) * C.BLOCK_N
        buf = _topk_tile(buf, q, qg, rs_rows, offs_m, row_ok, start_n, b, h, k0, nq, nk, nk_eff, K, V, M, NK,
                         scale, C, True)
    cols = tl.arange(0, C.TOPK_W)
    kth = tl.max(tl.where(cols[None, :] == TOPK - 1, buf, float("-inf")), 1)
    tl.store(M.thr + aux, kth, mask=row_ok)


@triton.jit
def _sums_tile(z, m_i, q, do, qg, rs_rows, thr, offs_m, row_ok, start_n, b, h, k0, nq, nk, nk_eff, K, V, M, NK,
               scale, C, MASKED: tl.constexpr):
    """One key tile of :func:`attn_group_sums`: update ``(z, m_i)``."""
    offs_n, col_ok, k, v, kg, kr = key_tile(K, V, M, b, h, k0, start_n, nk_eff, NK, C, MASKED, C.WITH_DO)
    s = scores(q, k, scale, C.DOT)
    denom, sem = tile_masks(s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows, M.allow,
                            C.CAUSAL, C.HAS_ALLOW, C.HAS_SUBSET, C.ALL_KEYS, C.HAS_TOPK, C.BLOCK_M, C.BLOCK_N,
                            MASKED)
    gcols = tl.arange(0, C.G_PAD)
    onehot = ((kg[:, None] == gcols[None, :]) & col_ok[:, None]).to(tl.float32)
    if C.WITH_DO:
        e = tl.where(denom, tl.exp2((s - m_i[:, None]) * LOG2E), 0.0)
        dp = mm(do, tl.trans(v), C.DOT)
        z += mm_onehot(e * dp, onehot, C.DOT)
    else:
        m_new, alpha, p = _online_softmax_step(s, denom, m_i)
        z = z * alpha[:, None] + mm_onehot(p, onehot, C.DOT)
        m_i = m_new
    return z, m_i


@triton.jit(do_not_specialize=_SIZES)
def attn_group_sums(Q, K, V, S, M, T, H, NQ, NK, scale, Shift, Zout, DO, NG, C):
    """Per-(row, key group) sums for the segmented fixed gate.

    Without ``WITH_DO``: online ``m = max_j s_j`` and ``Z_g = sum_{j in g} e^{s_j - m}`` (writes
    ``Shift = m``). With ``WITH_DO`` (backward): ``R_g = sum_{j in g} e^{s_j - m} (dO · v_j)`` for
    the given ``Shift``. Group sums are a dot with the key tile's one-hot ``[BLOCK_N, G_PAD]``.
    """
    pid_m, n_m, b, h, q0, nq, k0, nk, nk_eff, offs_m, row_ok, aux = query_program(S, H, NQ, NK, C)
    q, qg, rs_rows, thr = query_rows(Q, M, b, h, q0, offs_m, row_ok, aux, NQ, C)
    m_i = tl.full([C.BLOCK_M], float("-inf"), dtype=tl.float32)
    do = q
    if C.WITH_DO:
        do = load_rows(view_ptrs(DO, b, h, q0, offs_m, C.HEAD_D), row_ok, True)
        if C.UPCAST:
            do = do.to(tl.float32)
        m_i = tl.load(Shift + aux, mask=row_ok, other=float("-inf"))
        m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    z = tl.zeros([C.BLOCK_M, C.G_PAD], dtype=tl.float32)
    # A pre-pass of the fixed gate: every key tile up to the bounds, masked, in one small loop
    # (the tile lists' two loops and indirect loads cost this kernel its register budget).
    for start_n in range(0, key_range_end(pid_m, nq, nk, nk_eff, C.BLOCK_M, C.CAUSAL), C.BLOCK_N):
        z, m_i = _sums_tile(z, m_i, q, do, qg, rs_rows, thr, offs_m, row_ok, start_n, b, h, k0, nq, nk, nk_eff,
                            K, V, M, NK, scale, C, True)
    if not C.WITH_DO:
        tl.store(Shift + aux, m_i, mask=row_ok)
    gcols = tl.arange(0, C.G_PAD)
    tl.store(Zout + aux[:, None] * NG + gcols[None, :], z, mask=row_ok[:, None] & (gcols[None, :] < NG))


@triton.jit(do_not_specialize=_SIZES + ["P", "p_sb", "p_sh", "p_sp"])
def attn_probes(Q, K, V, S, M, T, H, NQ, NK, scale, Probe, ProbeRows, P, p_sb, p_sh, p_sp, Lse, Mult, NG, C):
    """Final weights of the probe rows, recomputed from the saved ``lse`` (or shift and ``c_g``).

    One program per (key tile, batch x head) on axis 0 and per probe chunk on axis 1:
    ``W_pj = M_pj e^{s_pj - lse_p}`` (times ``c_{g(j)}`` for the fixed gate). Cost: ``P x Nk``
    logits, no ``N x N`` buffer. Every tile runs masked (probe rows are scattered).
    """
    pid_n, b, h = program_tile(tl.program_id(0), tl.cdiv(NK, C.BLOCK_N), H)
    pid_p = tl.program_id(1)
    q0, nq, k0, nk, nk_eff = seq_bounds(b, S, NQ, NK, C.VARLEN, C.HAS_KLEN)
    offs_p = pid_p * C.BLOCK_M + tl.arange(0, C.BLOCK_M)
    p_ok = offs_p < P
    rows = tl.load(ProbeRows + offs_p, mask=p_ok, other=0).to(tl.int32)
    row_ok = p_ok & (rows < nq) & (rows >= 0)
    rows = tl.where(row_ok, rows, 0)
    aux = aux_index(b, h, q0, rows, H, NQ, C.VARLEN)
    q, qg, rs_rows, thr = query_rows(Q, M, b, h, q0, rows, row_ok, aux, NQ, C)
    shift = tl.load(Lse + aux, mask=row_ok, other=float("-inf"))
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    offs_n, col_ok, k, v, kg, kr = key_tile(K, V, M, b, h, k0, pid_n * C.BLOCK_N, nk_eff, NK, C, True, False)
    s = scores(q, k, scale, C.DOT)
    denom, sem = tile_masks(s, thr, rows, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows, M.allow,
                            C.CAUSAL, C.HAS_ALLOW, C.HAS_SUBSET, C.ALL_KEYS, C.HAS_TOPK, C.BLOCK_M, C.BLOCK_N, True)
    w = tl.where(denom, tl.exp2((s - shift[:, None]) * LOG2E), 0.0)
    if C.FIXED:
        w = w * tl.load(Mult + aux[:, None] * NG + kg[None, :], mask=denom, other=0.0)
    if C.ALL_KEYS:
        w = tl.where(sem, w, 0.0)
    ptrs = Probe + b * p_sb + h * p_sh + offs_p[:, None] * p_sp + (k0 + offs_n)[None, :]
    tl.store(ptrs, w, mask=p_ok[:, None] & (offs_n < nk)[None, :])


@triton.jit
def _bwd_tile(q, do, k, v, qg, kg, kr, rs_rows, thr, shift, dl_row, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff,
              M, cmat, dmat, scale, C, MASKED: tl.constexpr):
    """Recompute one tile's weights and return ``(M ⊙ P, dS)`` (``dS`` without the scale)."""
    s = scores(q, k, scale, C.DOT)
    denom, sem = tile_masks(s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows, M.allow,
                            C.CAUSAL, C.HAS_ALLOW, C.HAS_SUBSET, C.ALL_KEYS, C.HAS_TOPK, C.BLOCK_M, C.BLOCK_N,
                            MASKED)
    p = tl.where(denom, tl.exp2((s - shift[:, None]) * LOG2E), 0.0)
    dp = mm(do, tl.trans(v), C.DOT)
    if C.FIXED:
        p = p * per_key(cmat, kg, C.G_PAD)
        dg = per_key(dmat, kg, C.G_PAD)
        ds = p * (dp - dg)
        pw = p
    else:
        if C.ALL_KEYS:
            pw = tl.where(sem, p, 0.0)
            dp = tl.where(sem, dp, 0.0)
        else:
            pw = p
        ds = p * (dp - dl_row[:, None])
    return pw, ds


@triton.jit
def _row_grads(M, b, h, q0, offs_m, row_ok, aux, Lse, DL, Mult, NG, C):
    """Per-row backward inputs: ``(shift, dl_row, cmat, dmat)`` (the lse or fixed-gate shift, ``D``
    per row, and for the fixed gate ``c_g`` and ``D_g`` per (row, group))."""
    shift = tl.load(Lse + aux, mask=row_ok, other=float("-inf"))
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    dl_row = tl.zeros([C.BLOCK_M], dtype=tl.float32)
    cmat = tl.zeros([C.BLOCK_M, C.G_PAD], dtype=tl.float32)
    dmat = cmat
    if C.FIXED:
        cmat = group_rows(Mult, aux, row_ok, NG, C.G_PAD)
        dmat = group_rows(DL, aux, row_ok, NG, C.G_PAD)
    else:
        dl_row = tl.load(DL + aux, mask=row_ok, other=0.0)
    return shift, dl_row, cmat, dmat


@triton.jit
def _dkdv_tile(dk, dv, k, v, kg, kr, offs_n, col_ok, start_m, b, h, q0, nq, nk, nk_eff, Q, DO, M, H, NQ, scale,
               Lse, DL, Mult, NG, C, MASKED: tl.constexpr):
    """One query tile of :func:`attn_bwd_dkdv`: ``dV += (M⊙P)^T dO``, ``dK += dS^T Q``."""
    offs_m = start_m + tl.arange(0, C.BLOCK_M)
    row_ok = offs_m < nq
    aux = aux_index(b, h, q0, offs_m, H, NQ, C.VARLEN)
    q, qg, rs_rows, thr = query_rows(Q, M, b, h, q0, offs_m, row_ok, aux, NQ, C)
    do = load_rows(view_ptrs(DO, b, h, q0, offs_m, C.HEAD_D), row_ok, MASKED)
    if C.UPCAST:
        do = do.to(tl.float32)
    shift, dl_row, cmat, dmat = _row_grads(M, b, h, q0, offs_m, row_ok, aux, Lse, DL, Mult, NG, C)
    pw, ds = _bwd_tile(q, do, k, v, qg, kg, kr, rs_rows, thr, shift, dl_row, offs_m, offs_n, row_ok, col_ok, nq, nk,
                       nk_eff, M, cmat, dmat, scale, C, MASKED)
    dv += mm(tl.trans(pw).to(do.dtype), do, C.DOT)
    dk += mm(tl.trans(ds).to(q.dtype), q, C.DOT)
    return dk, dv


@triton.jit(do_not_specialize=_SIZES)
def attn_bwd_dkdv(Q, K, V, S, M, T, H, NQ, NK, scale, DO, DK, DV, Lse, DL, Mult, NG, C):
    """Backward for one key tile: stream its listed query tiles, ``dV += (M⊙P)^T dO``,
    ``dK += scale dS^T Q``. ``T`` lists query tiles per key tile (full ones cover only valid rows)."""
    n_n = tl.cdiv(NK, C.BLOCK_N)
    pid_n, b, h = program_tile(tl.program_id(0), n_n, H)
    q0, nq, k0, nk, nk_eff = seq_bounds(b, S, NQ, NK, C.VARLEN, C.HAS_KLEN)
    offs_n, col_ok, k, v, kg, kr = key_tile(K, V, M, b, h, k0, pid_n * C.BLOCK_N, nk_eff, NK, C, True, True)
    dk = tl.zeros([C.BLOCK_N, C.HEAD_D], dtype=tl.float32)
    dv = tl.zeros([C.BLOCK_N, C.HEAD_D], dtype=tl.float32)
    base, n_full, n_part = tile_counts(T, b, pid_n, n_n, tl.cdiv(NQ, C.BLOCK_M), C.TAB_B)
    for i in range(0, n_full):
        start_m = tl.load(T.lst + base + i) * C.BLOCK_M
        dk, dv = _dkdv_tile(dk, dv, k, v, kg, kr, offs_n, col_ok, start_m, b, h, q0, nq, nk, nk_eff, Q, DO, M, H,
                            NQ, scale, Lse, DL, Mult, NG, C, False)
    for i in range(n_full, n_full + n_part):
        start_m = tl.load(T.lst + base + i) * C.BLOCK_M
        dk, dv = _dkdv_tile(dk, dv, k, v, kg, kr, offs_n, col_ok, start_m, b, h, q0, nq, nk, nk_eff, Q, DO, M, H,
                            NQ, scale, Lse, DL, Mult, NG, C, True)
    st = (offs_n < nk)[:, None]
    tl.store(view_ptrs(DK, b, h, k0, offs_n, C.HEAD_D), (dk * scale).to(DK.ptr.dtype.element_ty), mask=st)
    tl.store(view_ptrs(DV, b, h, k0, offs_n, C.HEAD_D), dv.to(DV.ptr.dtype.element_ty), mask=st)


@triton.jit
def _dq_tile(dq, q, do, qg, rs_rows, thr, shift, dl_row, cmat, dmat, offs_m, row_ok, start_n, b, h, k0, nq, nk,
             nk_eff, K, V, M, NK, scale, C, MASKED: tl.constexpr):
    """One key tile of :func:`attn_bwd_dq`: ``dQ += dS K``."""
    offs_n, col_ok, k, v, kg, kr = key_tile(K, V, M, b, h, k0, start_n, nk_eff, NK, C, MASKED, True)
    pw, ds = _bwd_tile(q, do, k, v, qg, kg, kr, rs_rows, thr, shift, dl_row, offs_m, offs_n, row_ok, col_ok, nq, nk,
                       nk_eff, M, cmat, dmat, scale, C, MASKED)
    return dq + mm(ds.to(k.dtype), k, C.DOT)


@triton.jit(do_not_specialize=_SIZES)
def attn_bwd_dq(Q, K, V, S, M, T, H, NQ, NK, scale, DO, DQ, Lse, DL, Mult, NG, C):
    """Backward for one query tile: stream its listed key tiles, ``dQ += scale dS K``."""
    pid_m, n_m, b, h, q0, nq, k0, nk, nk_eff, offs_m, row_ok, aux = query_program(S, H, NQ, NK, C)
    q, qg, rs_rows, thr = query_rows(Q, M, b, h, q0, offs_m, row_ok, aux, NQ, C)
    do = load_rows(view_ptrs(DO, b, h, q0, offs_m, C.HEAD_D), row_ok, True)
    if C.UPCAST:
        do = do.to(tl.float32)
    shift, dl_row, cmat, dmat = _row_grads(M, b, h, q0, offs_m, row_ok, aux, Lse, DL, Mult, NG, C)
    dq = tl.zeros([C.BLOCK_M, C.HEAD_D], dtype=tl.float32)
    base, n_full, n_part = tile_counts(T, b, pid_m, n_m, tl.cdiv(NK, C.BLOCK_N), C.TAB_B)
    for i in range(0, n_full):
        start_n = tl.load(T.lst + base + i) * C.BLOCK_N
        dq = _dq_tile(dq, q, do, qg, rs_rows, thr, shift, dl_row, cmat, dmat, offs_m, row_ok, start_n, b, h, k0, nq,
                      nk, nk_eff, K, V, M, NK, scale, C, False)
    for i in range(n_full, n_full + n_part):
        start_n = tl.load(T.lst + base + i) * C.BLOCK_N
        dq = _dq_tile(dq, q, do, qg, rs_rows, thr, shift, dl_row, cmat, dmat, offs_m, row_ok, start_n, b, h, k0, nq,
                      nk, nk_eff, K, V, M, NK, scale, C, True)
    tl.store(view_ptrs(DQ, b, h, q0, offs_m, C.HEAD_D), (dq * scale).to(DQ.ptr.dtype.element_ty),
             mask=row_ok[:, None])
