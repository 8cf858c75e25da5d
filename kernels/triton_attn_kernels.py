"""Triton kernels of the fused masked attention (forward, top-k thresholds, segment sums, probes, backward).

All kernels share one argument block (tensors made contiguous by the host, see
``triton_attn_ops.py``):

* ``Q``/``K``/``V`` with strides ``(sb, sh, sn)`` per (batch, head, row); the head dim is
  contiguous. Padded input uses ``[B, H, N, D]``; packed varlen ``[T, H, D]`` uses ``sb = 0``
  and row ``q0 + i`` with ``q0 = cu_seqlens[b]``.
* per-row auxiliaries (lse, top-k threshold, shift, D) share the strides ``(a_sb, a_sh, a_sn)``
  (``[B, H, Nq]`` padded, ``[Tq, H]`` varlen); per-(row, key group) arrays append a trailing
  ``NG`` axis.
* group ids ``QG``/``KG``, subset ranks ``KR`` (rank of a key inside ``subset_group``, -1 outside),
  the ``allow`` matrix as two int32 bit words per query group (``Allow [Gq, 2]``), the
  ``row_subset`` words ``RS`` and the per-tile class table ``Tab`` (0 = empty, 1 = mixed, 2 = full).

Notation: ``s = scale q k^T``; ``lse_i = log sum_{j in denom(i)} e^{s_ij}``;
``P_ij = e^{s_ij - lse_i}`` on the denominator set. Exponentials are base 2
(``e^x = 2^{x log2 e}``).

Forward (online softmax, FlashAttention-2): per key tile, ``m' = max(m, rowmax s)``,
``l <- l e^{m-m'} + rowsum e^{s-m'}``, ``acc <- acc e^{m-m'} + (M ⊙ e^{s-m'}) V`` where ``M`` is the
weight mask (the semantic mask under ``all_keys``, the denominator set otherwise);
``O = acc / l (+ epilogue)``, ``lse = m + log l``.

Segmented with a fixed gate (DPL) runs in two passes: ``attn_group_sums`` gives the row max ``m``
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

from vlm.kernels.triton_attn_masks import group_rows, mm, mm_onehot, per_key, scores, seq_bounds, tile_masks

#: ``log2(e)``. Bound as a ``tl.constexpr`` *object*: compiled Triton rejects plain (or merely
#: annotated) module globals inside ``@triton.jit`` code; the interpreter never checks.
LOG2E = tl.constexpr(1.4426950408889634)

#: Integer arguments that are sizes, not strides of the contiguous head dim: they are not
#: specialised on ``== 1`` / divisibility by 16, so a new sequence length, head count or group
#: count reuses the compiled kernel instead of compiling another variant (the alignment of the
#: strides, which vectorises loads, stays specialised).
_SIZE_ARGS = ["a_sb", "a_sh", "g_qsb", "g_ksb", "rs_sb", "rs_sn", "tab_sb", "tab_sq", "tab_sk",
              "H", "NQ", "NK"]


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, qg, rs_rows, thr, shift, aux, offs_m, row_ok, start_n,
    b, h, k0, nq, nk, nk_eff, K, V, KG, KR, cmat, k_sb, k_sh, k_sn, g_ksb, Allow, scale,
    CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr,
    ALL_KEYS: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, FIXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT: tl.constexpr, G_PAD: tl.constexpr,
):
    """One key tile of the forward: update ``(acc, m_i, l_i)``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < nk_eff
    k_rows = b * k_sb + h * k_sh + (k0 + offs_n) * k_sn
    k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kg = offs_n * 0
    kr = offs_n * 0 - 1
    if HAS_KG:
        kg = tl.load(KG + b * g_ksb + k0 + offs_n, mask=col_ok, other=0)
    if HAS_SUBSET:
        kr = tl.load(KR + b * g_ksb + k0 + offs_n, mask=col_ok, other=-1)
    s = scores(q, k, scale, DOT)
    denom, sem = tile_masks(s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr,
                            rs_rows, Allow, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS,
                            HAS_TOPK, BLOCK_M, BLOCK_N)
    if FIXED:
        p = tl.where(denom, tl.exp2((s - shift[:, None]) * LOG2E) * per_key(cmat, kg, G_PAD), 0.0)
        acc += mm(p.to(v.dtype), v, DOT)
    else:
        s_m = tl.where(denom, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_m, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        p = tl.exp2((s_m - m_safe[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if ALL_KEYS:
            p = tl.where(sem, p, 0.0)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_SIZE_ARGS + ["NG"])
def attn_fwd(
    Q, K, V, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, a_sb, a_sh, a_sn, CuQ, CuK, KLen,
    QG, KG, KR, g_qsb, g_ksb, Allow, RS, rs_sb, rs_sn, Tab, tab_sb, tab_sq, tab_sk, Thr,
    H, NQ, NK, scale,
    Out, Lse, Epi, Shift, Mult, NG,
    VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr,
    HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr, ALL_KEYS: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    FIXED: tl.constexpr, HAS_EPI: tl.constexpr, G_PAD: tl.constexpr,
):
    """Forward: one program per (query tile, batch x head). Writes ``Out`` and ``Lse``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q0, nq, k0, nk, nk_eff = seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN, HAS_KLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < nq
    q_rows = b * q_sb + h * q_sh + (q0 + offs_m) * q_sn
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    aux = b * a_sb + h * a_sh + (q0 + offs_m) * a_sn
    qg = offs_m * 0
    if HAS_ALLOW:
        qg = tl.load(QG + b * g_qsb + q0 + offs_m, mask=row_ok, other=0)
    rs_rows = RS + b * rs_sb + (q0 + offs_m) * rs_sn
    thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_TOPK:
        thr = tl.load(Thr + aux, mask=row_ok, other=float("-inf"))
    shift = tl.zeros([BLOCK_M], dtype=tl.float32)
    cmat = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)
    if FIXED:
        shift = tl.load(Shift + aux, mask=row_ok, other=float("-inf"))
        shift = tl.where(shift == float("-inf"), 0.0, shift)
        cmat = group_rows(Mult, aux, row_ok, NG, G_PAD)
    hi = nk_eff
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + nk - nq)
    hi = tl.where(pid_m * BLOCK_M < nq, hi, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        if HAS_TABLE:
            cls = tl.load(Tab + b * tab_sb + pid_m * tab_sq + (start_n // BLOCK_N) * tab_sk)
            run = cls != 0
            if ALL_KEYS:
                run = cls >= 0  # empty tiles still feed the all-key denominator
            if run:
                acc, m_i, l_i = _fwd_tile(
                    acc, m_i, l_i, q, qg, rs_rows, thr, shift, aux, offs_m, row_ok, start_n,
                    b, h, k0, nq, nk, nk_eff, K, V, KG, KR, cmat, k_sb, k_sh, k_sn, g_ksb,
                    Allow, scale, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS, HAS_TOPK,
                    HAS_KG, FIXED, BLOCK_M, BLOCK_N, HEAD_D, UPCAST, DOT, G_PAD)
        else:
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, qg, rs_rows, thr, shift, aux, offs_m, row_ok, start_n,
                b, h, k0, nq, nk, nk_eff, K, V, KG, KR, cmat, k_sb, k_sh, k_sn, g_ksb,
                Allow, scale, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS, HAS_TOPK,
                HAS_KG, FIXED, BLOCK_M, BLOCK_N, HEAD_D, UPCAST, DOT, G_PAD)
    if FIXED:
        out = acc
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(Lse + aux, lse, mask=row_ok)
    if HAS_EPI:
        out += tl.load(Epi + (b * H + h) * HEAD_D + offs_d).to(tl.float32)[None, :]
    tl.store(Out + q_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


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


@triton.jit(do_not_specialize=_SIZE_ARGS + ["TOPK"])
def attn_topk_threshold(
    Q, K, V, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, a_sb, a_sh, a_sn, CuQ, CuK, KLen,
    QG, KG, KR, g_qsb, g_ksb, Allow, RS, rs_sb, rs_sn, Tab, tab_sb, tab_sq, tab_sk, Thr,
    H, NQ, NK, scale,
    TOPK,
    VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr,
    HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr, ALL_KEYS: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    SORT: tl.constexpr, TOPK_W: tl.constexpr,
):
    """KTPP pass 1: each row's k-th largest logit over its base set (``-inf`` if fewer keys).

    Logits come in the same ``BLOCK_M x BLOCK_N`` tiles as in the attention passes (bit-exact
    ``s >= threshold`` there). A running top-``TOPK_W`` list per row (``TOPK_W >= k``, a power of
    two, at least ``BLOCK_N``), sorted descending, is merged with each tile: by sorting networks
    when ``SORT`` (GPU), else by ranks (interpreter, where ``tl.sort`` costs seconds).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q0, nq, k0, nk, nk_eff = seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN, HAS_KLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < nq
    q = tl.load(Q + (b * q_sb + h * q_sh + (q0 + offs_m) * q_sn)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    aux = b * a_sb + h * a_sh + (q0 + offs_m) * a_sn
    qg = offs_m * 0
    if HAS_ALLOW:
        qg = tl.load(QG + b * g_qsb + q0 + offs_m, mask=row_ok, other=0)
    rs_rows = RS + b * rs_sb + (q0 + offs_m) * rs_sn
    hi = nk_eff
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + nk - nq)
    hi = tl.where(pid_m * BLOCK_M < nq, hi, 0)
    buf = tl.full([BLOCK_M, TOPK_W], float("-inf"), dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < nk_eff
        k = tl.load(K + (b * k_sb + h * k_sh + (k0 + offs_n) * k_sn)[:, None] + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        kg = offs_n * 0
        kr = offs_n * 0 - 1
        if HAS_KG:
            kg = tl.load(KG + b * g_ksb + k0 + offs_n, mask=col_ok, other=0)
        if HAS_SUBSET:
            kr = tl.load(KR + b * g_ksb + k0 + offs_n, mask=col_ok, other=-1)
        s = scores(q, k, scale, DOT)
        base, sem = tile_masks(s, s, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr,
                               rs_rows, Allow, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS, False,
                               BLOCK_M, BLOCK_N)
        tile = tl.where(base, s, float("-inf"))
        if SORT:
            buf = _merge_topk_by_sort(buf, tile, BLOCK_M, TOPK_W, BLOCK_N)
        else:
            buf = _merge_topk_by_rank(buf, tile, TOPK_W, BLOCK_N)
    cols = tl.arange(0, TOPK_W)
    kth = tl.max(tl.where(cols[None, :] == TOPK - 1, buf, float("-inf")), 1)
    tl.store(Thr + aux, kth, mask=row_ok)


@triton.jit(do_not_specialize=_SIZE_ARGS + ["NG"])
def attn_group_sums(
    Q, K, V, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, a_sb, a_sh, a_sn, CuQ, CuK, KLen,
    QG, KG, KR, g_qsb, g_ksb, Allow, RS, rs_sb, rs_sn, Tab, tab_sb, tab_sq, tab_sk, Thr,
    H, NQ, NK, scale,
    Shift, Zout, DO, NG,
    VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr,
    HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr, ALL_KEYS: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    WITH_DO: tl.constexpr, G_PAD: tl.constexpr,
):
    """Per-(row, key group) sums for the segmented fixed gate.

    Without ``WITH_DO``: online ``m = max_j s_j`` and ``Z_g = sum_{j in g} e^{s_j - m}`` (writes
    ``Shift = m``). With ``WITH_DO`` (backward): ``R_g = sum_{j in g} e^{s_j - m} (dO · v_j)`` for
    the given ``Shift``. Group sums are a dot with the key tile's one-hot ``[BLOCK_N, G_PAD]``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q0, nq, k0, nk, nk_eff = seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN, HAS_KLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    gcols = tl.arange(0, G_PAD)
    row_ok = offs_m < nq
    q_rows = b * q_sb + h * q_sh + (q0 + offs_m) * q_sn
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    aux = b * a_sb + h * a_sh + (q0 + offs_m) * a_sn
    qg = offs_m * 0
    if HAS_ALLOW:
        qg = tl.load(QG + b * g_qsb + q0 + offs_m, mask=row_ok, other=0)
    rs_rows = RS + b * rs_sb + (q0 + offs_m) * rs_sn
    thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_TOPK:
        thr = tl.load(Thr + aux, mask=row_ok, other=float("-inf"))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if WITH_DO:
        do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            do = do.to(tl.float32)
        m_i = tl.load(Shift + aux, mask=row_ok, other=float("-inf"))
        m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    z = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)
    hi = nk_eff
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + nk - nq)
    hi = tl.where(pid_m * BLOCK_M < nq, hi, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < nk_eff
        k_rows = b * k_sb + h * k_sh + (k0 + offs_n) * k_sn
        k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        kg = tl.load(KG + b * g_ksb + k0 + offs_n, mask=col_ok, other=0)
        kr = offs_n * 0 - 1
        if HAS_SUBSET:
            kr = tl.load(KR + b * g_ksb + k0 + offs_n, mask=col_ok, other=-1)
        s = scores(q, k, scale, DOT)
        denom, sem = tile_masks(s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg,
                                kr, rs_rows, Allow, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS, HAS_TOPK,
                                BLOCK_M, BLOCK_N)
        onehot = ((kg[:, None] == gcols[None, :]) & col_ok[:, None]).to(tl.float32)
        if WITH_DO:
            v = tl.load(V + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            e = tl.where(denom, tl.exp2((s - m_i[:, None]) * LOG2E), 0.0)
            dp = mm(do, tl.trans(v), DOT)
            z += mm_onehot(e * dp, onehot, DOT)
        else:
            s_m = tl.where(denom, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_m, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            p = tl.exp2((s_m - m_safe[:, None]) * LOG2E)
            z = z * alpha[:, None] + mm_onehot(p, onehot, DOT)
            m_i = m_new
    if not WITH_DO:
        tl.store(Shift + aux, m_i, mask=row_ok)
    tl.store(Zout + aux[:, None] * NG + gcols[None, :], z,
             mask=row_ok[:, None] & (gcols[None, :] < NG))


@triton.jit(do_not_specialize=_SIZE_ARGS + ["P", "p_sb", "p_sh", "p_sp", "NG"])
def attn_probes(
    Q, K, V, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, a_sb, a_sh, a_sn, CuQ, CuK, KLen,
    QG, KG, KR, g_qsb, g_ksb, Allow, RS, rs_sb, rs_sn, Tab, tab_sb, tab_sq, tab_sk, Thr,
    H, NQ, NK, scale,
    Probe, ProbeRows, P, p_sb, p_sh, p_sp, Lse, Mult, NG,
    VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr,
    HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr, ALL_KEYS: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    FIXED: tl.constexpr,
):
    """Final weights of the probe rows, recomputed from the saved ``lse`` (or shift and ``c_g``).

    One program per (key tile, batch x head, probe chunk): ``W_pj = M_pj e^{s_pj - lse_p}``
    (times ``c_{g(j)}`` for the fixed gate). Cost: ``P x Nk`` logits, no ``N x N`` buffer.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_p = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q0, nq, k0, nk, nk_eff = seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN, HAS_KLEN)
    offs_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    p_ok = offs_p < P
    rows = tl.load(ProbeRows + offs_p, mask=p_ok, other=0).to(tl.int32)
    row_ok = p_ok & (rows < nq) & (rows >= 0)
    rows = tl.where(row_ok, rows, 0)
    q = tl.load(Q + (b * q_sb + h * q_sh + (q0 + rows) * q_sn)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    aux = b * a_sb + h * a_sh + (q0 + rows) * a_sn
    qg = rows * 0
    if HAS_ALLOW:
        qg = tl.load(QG + b * g_qsb + q0 + rows, mask=row_ok, other=0)
    rs_rows = RS + b * rs_sb + (q0 + rows) * rs_sn
    thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_TOPK:
        thr = tl.load(Thr + aux, mask=row_ok, other=float("-inf"))
    shift = tl.load(Lse + aux, mask=row_ok, other=float("-inf"))
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < nk_eff
    k = tl.load(K + (b * k_sb + h * k_sh + (k0 + offs_n) * k_sn)[:, None] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    kg = offs_n * 0
    kr = offs_n * 0 - 1
    if HAS_KG:
        kg = tl.load(KG + b * g_ksb + k0 + offs_n, mask=col_ok, other=0)
    if HAS_SUBSET:
        kr = tl.load(KR + b * g_ksb + k0 + offs_n, mask=col_ok, other=-1)
    s = scores(q, k, scale, DOT)
    denom, sem = tile_masks(s, thr, rows, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr,
                            rs_rows, Allow, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS,
                            HAS_TOPK, BLOCK_M, BLOCK_N)
    w = tl.where(denom, tl.exp2((s - shift[:, None]) * LOG2E), 0.0)
    if FIXED:
        w = w * tl.load(Mult + aux[:, None] * NG + kg[None, :], mask=denom, other=0.0)
    if ALL_KEYS:
        w = tl.where(sem, w, 0.0)
    ptrs = Probe + b * p_sb + h * p_sh + offs_p[:, None] * p_sp + (k0 + offs_n)[None, :]
    tl.store(ptrs, w, mask=p_ok[:, None] & (offs_n < nk)[None, :])


@triton.jit
def _bwd_tile(
    q, do, k, v, qg, kg, kr, rs_rows, thr, shift, dl_row, aux, offs_m, offs_n, row_ok, col_ok,
    nq, nk, nk_eff, Allow, cmat, dmat, scale,
    CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr,
    ALL_KEYS: tl.constexpr, HAS_TOPK: tl.constexpr, FIXED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, G_PAD: tl.constexpr,
):
    """Recompute one tile's weights and return ``(M ⊙ P, dS)`` (``dS`` without the scale)."""
    s = scores(q, k, scale, DOT)
    denom, sem = tile_masks(s, thr, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr,
                            rs_rows, Allow, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS,
                            HAS_TOPK, BLOCK_M, BLOCK_N)
    p = tl.where(denom, tl.exp2((s - shift[:, None]) * LOG2E), 0.0)
    dp = mm(do, tl.trans(v), DOT)
    if FIXED:
        p = p * per_key(cmat, kg, G_PAD)
        dg = per_key(dmat, kg, G_PAD)
        ds = p * (dp - dg)
        pw = p
    else:
        if ALL_KEYS:
            pw = tl.where(sem, p, 0.0)
            dp = tl.where(sem, dp, 0.0)
        else:
            pw = p
        ds = p * (dp - dl_row[:, None])
    return pw, ds


@triton.jit(do_not_specialize=_SIZE_ARGS + ["NG"])
def attn_bwd_dkdv(
    Q, K, V, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, a_sb, a_sh, a_sn, CuQ, CuK, KLen,
    QG, KG, KR, g_qsb, g_ksb, Allow, RS, rs_sb, rs_sn, Tab, tab_sb, tab_sq, tab_sk, Thr,
    H, NQ, NK, scale,
    DO, DK, DV, Lse, DL, Mult, NG,
    VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr,
    HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr, ALL_KEYS: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    FIXED: tl.constexpr, G_PAD: tl.constexpr,
):
    """Backward for one key tile: stream query tiles, ``dV += (M⊙P)^T dO``, ``dK += scale dS^T Q``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q0, nq, k0, nk, nk_eff = seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN, HAS_KLEN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < nk_eff
    k_rows = b * k_sb + h * k_sh + (k0 + offs_n) * k_sn
    k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kg = offs_n * 0
    kr = offs_n * 0 - 1
    if HAS_KG:
        kg = tl.load(KG + b * g_ksb + k0 + offs_n, mask=col_ok, other=0)
    if HAS_SUBSET:
        kr = tl.load(KR + b * g_ksb + k0 + offs_n, mask=col_ok, other=-1)
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - (nk - nq), 0) // BLOCK_M * BLOCK_M
    hi = tl.where(pid_n * BLOCK_N < nk_eff, nq, 0)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < nq
        run = True
        if HAS_TABLE:
            cls = tl.load(Tab + b * tab_sb + (start_m // BLOCK_M) * tab_sq + pid_n * tab_sk)
            run = cls != 0
            if ALL_KEYS:
                run = cls >= 0
        if run:
            q_rows = b * q_sb + h * q_sh + (q0 + offs_m) * q_sn
            q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            aux = b * a_sb + h * a_sh + (q0 + offs_m) * a_sn
            qg = offs_m * 0
            if HAS_ALLOW:
                qg = tl.load(QG + b * g_qsb + q0 + offs_m, mask=row_ok, other=0)
            rs_rows = RS + b * rs_sb + (q0 + offs_m) * rs_sn
            thr = tl.zeros([BLOCK_M], dtype=tl.float32)
            if HAS_TOPK:
                thr = tl.load(Thr + aux, mask=row_ok, other=float("-inf"))
            shift = tl.load(Lse + aux, mask=row_ok, other=float("-inf"))
            shift = tl.where(shift == float("-inf"), 0.0, shift)
            dl_row = tl.zeros([BLOCK_M], dtype=tl.float32)
            cmat = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)
            dmat = cmat
            if FIXED:
                cmat = group_rows(Mult, aux, row_ok, NG, G_PAD)
                dmat = group_rows(DL, aux, row_ok, NG, G_PAD)
            else:
                dl_row = tl.load(DL + aux, mask=row_ok, other=0.0)
            pw, ds = _bwd_tile(q, do, k, v, qg, kg, kr, rs_rows, thr, shift, dl_row, aux, offs_m,
                               offs_n, row_ok, col_ok, nq, nk, nk_eff, Allow, cmat, dmat,
                               scale, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS, HAS_TOPK,
                               FIXED, BLOCK_M, BLOCK_N, DOT, G_PAD)
            dv += mm(tl.trans(pw).to(do.dtype), do, DOT)
            dk += mm(tl.trans(ds).to(q.dtype), q, DOT)
    st = offs_n < nk
    tl.store(DK + k_rows[:, None] + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=st[:, None])
    tl.store(DV + k_rows[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=st[:, None])


@triton.jit(do_not_specialize=_SIZE_ARGS + ["NG"])
def attn_bwd_dq(
    Q, K, V, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, a_sb, a_sh, a_sn, CuQ, CuK, KLen,
    QG, KG, KR, g_qsb, g_ksb, Allow, RS, rs_sb, rs_sn, Tab, tab_sb, tab_sq, tab_sk, Thr,
    H, NQ, NK, scale,
    DO, DQ, Lse, DL, Mult, NG,
    VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr,
    HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr, ALL_KEYS: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_KG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    FIXED: tl.constexpr, G_PAD: tl.constexpr,
):
    """Backward for one query tile: stream key tiles, ``dQ += scale dS K``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q0, nq, k0, nk, nk_eff = seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN, HAS_KLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < nq
    q_rows = b * q_sb + h * q_sh + (q0 + offs_m) * q_sn
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    aux = b * a_sb + h * a_sh + (q0 + offs_m) * a_sn
    qg = offs_m * 0
    if HAS_ALLOW:
        qg = tl.load(QG + b * g_qsb + q0 + offs_m, mask=row_ok, other=0)
    rs_rows = RS + b * rs_sb + (q0 + offs_m) * rs_sn
    thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_TOPK:
        thr = tl.load(Thr + aux, mask=row_ok, other=float("-inf"))
    shift = tl.load(Lse + aux, mask=row_ok, other=float("-inf"))
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    dl_row = tl.zeros([BLOCK_M], dtype=tl.float32)
    cmat = tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32)
    dmat = cmat
    if FIXED:
        cmat = group_rows(Mult, aux, row_ok, NG, G_PAD)
        dmat = group_rows(DL, aux, row_ok, NG, G_PAD)
    else:
        dl_row = tl.load(DL + aux, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    hi = nk_eff
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + nk - nq)
    hi = tl.where(pid_m * BLOCK_M < nq, hi, 0)
    for start_n in range(0, hi, BLOCK_N):
        run = True
        if HAS_TABLE:
            cls = tl.load(Tab + b * tab_sb + pid_m * tab_sq + (start_n // BLOCK_N) * tab_sk)
            run = cls != 0
            if ALL_KEYS:
                run = cls >= 0
        if run:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < nk_eff
            k_rows = b * k_sb + h * k_sh + (k0 + offs_n) * k_sn
            k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            kg = offs_n * 0
            kr = offs_n * 0 - 1
            if HAS_KG:
                kg = tl.load(KG + b * g_ksb + k0 + offs_n, mask=col_ok, other=0)
            if HAS_SUBSET:
                kr = tl.load(KR + b * g_ksb + k0 + offs_n, mask=col_ok, other=-1)
            pw, ds = _bwd_tile(q, do, k, v, qg, kg, kr, rs_rows, thr, shift, dl_row, aux, offs_m,
                               offs_n, row_ok, col_ok, nq, nk, nk_eff, Allow, cmat, dmat,
                               scale, CAUSAL, HAS_ALLOW, HAS_SUBSET, ALL_KEYS, HAS_TOPK,
                               FIXED, BLOCK_M, BLOCK_N, DOT, G_PAD)
            dq += mm(ds.to(k.dtype), k, DOT)
    tl.store(DQ + q_rows[:, None] + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])
