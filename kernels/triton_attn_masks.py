"""Triton device helpers shared by every masked-attention kernel: sequence bounds, masks, scores.

Each kernel program owns one ``BLOCK_M x BLOCK_N`` tile of logits at a time. These helpers
decide, for such a tile, which (query, key) pairs are in play:

* ``structural``: padding (``k_lengths``, varlen ends) and bottom-right aligned causality,
  ``j <= i + (Nk - Nq)``. These keys never enter any denominator.
* ``semantic``: the group ``allow`` matrix (one bit word pair per query group, so no N x N
  mask exists anywhere) and TCPA's ``row_subset`` bitmask: for a key of rank ``r`` inside
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
):
    """``(denom, sem)`` of a tile.

    ``denom`` is the row's denominator set: structural & semantic (& top-k) for
    ``softmax``/``segmented``; structural (& top-k) for ``all_keys``, whose semantic mask ``sem``
    only zeroes weights after normalisation. Top-k keeps ``s >= thr`` (the row's k-th largest
    logit of its base set, ``-inf`` when the row has fewer than k keys).
    """
    ok = structural(offs_m, offs_n, nq, nk, nk_eff, CAUSAL)
    sem = semantic(qg, kg, kr, rs_rows, row_ok, col_ok, Allow, HAS_ALLOW, HAS_SUBSET, BLOCK_M, BLOCK_N)
    if ALL_KEYS:
        denom = ok
    else:
        denom = ok & sem
    if HAS_TOPK:
        denom = denom & (s >= thr[:, None])
    return denom, sem
