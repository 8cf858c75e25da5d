"""Triton device helpers shared by every masked-attention kernel: sequence bounds, masks, scores.

Each kernel program owns one ``BLOCK_M x BLOCK_N`` tile of logits at a time. These helpers
decide, for such a tile, which (query, key) pairs are in play:

* ``structural``: padding (``k_lengths``, varlen ends) and bottom-right aligned causality,
  ``j <= i + (Nk - Nq)``. These keys never enter any denominator.
* ``semantic``: the group ``allow`` matrix (gathered from ``[Gq, Gk]`` by the two group ids, so
  no N x N mask exists anywhere) and TCPA's ``row_subset`` bitmask: for a key of rank ``r`` inside
  ``subset_group``, bit ``r % 64`` of word ``r // 64`` of the query row's words decides.
* ``tile_semantic``: the same, but first consults the per-tile class table built on the host
  from the groups present in each tile (0 = no pair allowed, 1 = mixed, 2 = every pair allowed),
  so fully allowed tiles skip the gathers and empty tiles are skipped by the caller.

``scores`` computes ``s = scale * q k^T`` with the *same* operand shapes in every kernel (the
query tile is always the left operand). That keeps the forward, the top-k threshold pass and the
backward bit-identical, which top-k's ``s >= threshold`` test relies on.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``IEEE`` forces full fp32 products (no TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def scores(q, k, scale, IEEE: tl.constexpr):
    """Scaled logits ``s = scale * q @ k^T`` of one tile, fp32 ``[BLOCK_M, BLOCK_N]``."""
    return mm(q, tl.trans(k), IEEE) * scale


@triton.jit
def seq_bounds(b, CuQ, CuK, KLen, NQ, NK, VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr):
    """Start rows and lengths of sequence ``b``: ``(q0, nq, k0, nk, nk_eff)``.

    ``nk`` is the full key length (it fixes the causal diagonal), ``nk_eff`` additionally
    drops ``k_lengths`` padding.
    """
    if VARLEN:
        q0 = tl.load(CuQ + b)
        nq = tl.load(CuQ + b + 1) - q0
        k0 = tl.load(CuK + b)
        nk = tl.load(CuK + b + 1) - k0
    else:
        q0 = 0
        nq = NQ
        k0 = 0
        nk = NK
    nk_eff = nk
    if HAS_KLEN:
        nk_eff = tl.minimum(nk, tl.load(KLen + b).to(tl.int32))
    return q0, nq, k0, nk, nk_eff


@triton.jit
def structural(offs_m, offs_n, nq, nk, nk_eff, CAUSAL: tl.constexpr):
    """Padding and causal mask of a tile (True = key is a candidate for the row)."""
    ok = (offs_m[:, None] < nq) & (offs_n[None, :] < nk_eff)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (nk - nq))
    return ok


@triton.jit
def semantic(
    qg, kg, kr, rs_rows, row_ok, col_ok, Allow, GK,
    HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Group ``allow`` and ``row_subset`` mask of a tile, evaluated element by element.

    ``qg [BLOCK_M]``/``kg [BLOCK_N]`` are group ids, ``kr`` the key's rank inside
    ``subset_group`` (-1 outside it), ``rs_rows`` pointers to each row's first bitmask word.
    """
    sem = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    ok2 = row_ok[:, None] & col_ok[None, :]
    if HAS_ALLOW:
        a = tl.load(Allow + qg[:, None] * GK + kg[None, :], mask=ok2, other=0)
        sem = sem & (a != 0)
    if HAS_SUBSET:
        r = tl.maximum(kr, 0)
        word = tl.load(rs_rows[:, None] + (r // 64)[None, :], mask=ok2 & (kr[None, :] >= 0), other=0)
        bit = (word >> (r % 64).to(tl.int64)[None, :]) & 1
        sem = sem & ((kr[None, :] < 0) | (bit != 0))
    return sem


@triton.jit
def tile_semantic(
    cls, qg, kg, kr, rs_rows, row_ok, col_ok, Allow, GK,
    HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``semantic`` behind the tile class: evaluate only when the tile is mixed (class 1)."""
    if HAS_TABLE:
        sem = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1) | (cls == 2)
        if cls == 1:
            sem = semantic(qg, kg, kr, rs_rows, row_ok, col_ok, Allow, GK,
                           HAS_ALLOW, HAS_SUBSET, BLOCK_M, BLOCK_N)
    else:
        sem = semantic(qg, kg, kr, rs_rows, row_ok, col_ok, Allow, GK,
                       HAS_ALLOW, HAS_SUBSET, BLOCK_M, BLOCK_N)
    return sem


@triton.jit
def tile_masks(
    s, thr, cls, offs_m, offs_n, row_ok, col_ok, nq, nk, nk_eff, qg, kg, kr, rs_rows, Allow, GK,
    CAUSAL: tl.constexpr, HAS_ALLOW: tl.constexpr, HAS_SUBSET: tl.constexpr, HAS_TABLE: tl.constexpr,
    ALL_KEYS: tl.constexpr, HAS_TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``(denom, sem)`` of a tile.

    ``denom`` is the row's denominator set: structural & semantic (& top-k) for
    ``softmax``/``segmented``; structural (& top-k) for ``all_keys``, whose semantic mask ``sem``
    only zeroes weights after normalisation. Top-k keeps ``s >= thr`` (the row's k-th largest
    logit of its base set, ``-inf`` when the row has fewer than k keys).
    """
    ok = structural(offs_m, offs_n, nq, nk, nk_eff, CAUSAL)
    sem = tile_semantic(cls, qg, kg, kr, rs_rows, row_ok, col_ok, Allow, GK,
                        HAS_ALLOW, HAS_SUBSET, HAS_TABLE, BLOCK_M, BLOCK_N)
    if ALL_KEYS:
        denom = ok
    else:
        denom = ok & sem
    if HAS_TOPK:
        denom = denom & (s >= thr[:, None])
    return denom, sem
