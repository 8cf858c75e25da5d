"""The layout of one attention call's masks: kernel-form mask tensors and compact tile lists.

What the group ids, ``allow``, ``row_subset``, ``k_lengths`` and ``cu_seqlens`` of a call fix, in
the form the kernels read (``triton_attn_args.Masks``/``Tiles``): int32 group ids, each key's rank
inside ``subset_group``, the ``allow`` matrix as bit words, and per query tile (per key tile for
``dK/dV``) the list of tiles that run, full ones first. Every block of a tower passes the same mask
tensors, so :func:`layout` caches the result per set of tensors (:data:`LAYOUT_CACHE`): the first
attention call of a pass builds it, the others reuse it. ``row_subset`` enters the layout by its
shape only (its words are read per call), so per-block subsets do not rebuild the tile lists.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

import torch
import triton
from torch import Tensor

from vlm.kernels.triton_attn_args import Masks, Seqs, Tiles


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


def _key(t: Optional[Tensor]) -> Any:
    """Identity of a mask tensor for the layout cache: object, storage, shape, strides, version.

    Inference tensors carry no version counter: an in-place edit of a mask tensor between two
    calls under ``inference_mode`` would go unseen (the runners build new tensors per pass).
    """
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return (id(t), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, version)


@dataclasses.dataclass
class Layout:
    """What a call's masks and sizes fix: mask tensors in kernel form and the compact tile lists.

    Built once and cached (:data:`LAYOUT_CACHE`): every block of a tower passes the same group,
    subset and length tensors, so only the first attention call of a pass builds it.
    """

    seqs: Seqs
    masks: Masks
    tiles_q: Tiles
    tiles_k: Tiles
    nq_arg: int
    nk_arg: int
    flags: dict[str, Any]
    seg_q: Optional[Tensor]  # varlen: sequence id of every packed query row
    refs: tuple  # the key tensors, held so that their storage is not reused while cached


#: Most layouts kept (least recently used goes first).
LAYOUT_CACHE_SIZE = 16
LAYOUT_CACHE: "collections.OrderedDict[tuple, Layout]" = collections.OrderedDict()


def _tile_lists(cls: Optional[Tensor], nq: Tensor, nk: Tensor, nke: Tensor, tm: int, tn: int, bm: int, bn: int,
                causal: bool, all_keys: bool) -> tuple[Tiles, Tiles]:
    """Compact lists of the tiles to run, full ones first: per query tile and per key tile.

    ``nq``/``nk``/``nke`` ``[Bt]``: query, key and unpadded key lengths per sequence. A tile runs
    when some pair in it is inside the bounds (padding, causal diagonal) and, unless ``all_keys``
    (whose empty tiles still feed the denominator), its class is not empty. It is *full* (runs
    without masks) when its class is full and every key column is inside the bounds of every
    row; for ``dK/dV`` also every query row must exist (rows past ``nq`` would add to the sums).
    """
    dev = nq.device
    i = torch.arange(tm, device=dev)[None, :, None]
    j = torch.arange(tn, device=dev)[None, None, :]
    nq, nk, nke = nq[:, None, None], nk[:, None, None], nke[:, None, None]
    off = nk - nq
    r0, r1 = i * bm, torch.minimum((i + 1) * bm, nq)
    c0, c1 = j * bn, (j + 1) * bn
    live = (r0 < nq) & (c0 < nke)
    inner = c1 <= nke
    if causal:
        live = live & (c0 <= r1 - 1 + off)
        inner = inner & (c1 - 1 <= r0 + off)
    run, full = live, live & inner
    if cls is not None:
        run = run & ((cls != 0) | all_keys)
        full = full & run & (cls == 2)
    full_k = full & ((i + 1) * bm <= nq)

    def lists(full: Tensor, run: Tensor) -> Tiles:
        n = full.shape[-1]
        order = torch.where(full, 0, torch.where(run, 1, 2)) * n + torch.arange(n, device=dev)
        lst = order.argsort(-1).to(torch.int32).contiguous()
        cnt = torch.stack([full.sum(-1), (run & ~full).sum(-1)], -1).to(torch.int32).contiguous()
        return Tiles(lst, cnt)

    return lists(full, run), lists(full_k.transpose(1, 2), run.transpose(1, 2))


def _build_layout(q: Tensor, k: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor],
                  qg: Optional[Tensor], kg: Optional[Tensor], allow: Optional[Tensor], row_subset: Optional[Tensor],
                  causal: bool, subset_group: int, all_keys: bool, bm: int, bn: int, refs: tuple) -> Layout:
    varlen = cu_q is not None
    dev = q.device
    i32 = torch.int32
    if varlen:
        cu_q, cu_k = cu_q.to(device=dev, dtype=i32).contiguous(), cu_k.to(device=dev, dtype=i32).contiguous()
        batch = cu_q.numel() - 1
        lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
        nq_arg = int(lens_q.max()) if batch > 0 else 0  # sync: grid size (once per cached layout)
        nk_arg = int(lens_k.max()) if batch > 0 else 0
        seg_q = torch.repeat_interleave(torch.arange(batch, device=dev), lens_q, output_size=q.shape[0])
    else:
        batch, nq_arg, nk_arg = q.shape[0], q.shape[2], k.shape[2]
        lens_q = torch.full((1,), nq_arg, device=dev)
        lens_k = torch.full((1,), nk_arg, device=dev)
        seg_q = None
    klen_t = klen.to(device=dev, dtype=torch.int64).contiguous() if klen is not None else None
    lens_e = torch.minimum(lens_k, klen_t) if klen_t is not None else lens_k
    has_allow, has_subset = allow is not None, row_subset is not None

    def groups(g: Optional[Tensor]) -> tuple[Optional[Tensor], bool]:
        if g is None:
            return None, False
        g = g.to(device=dev, dtype=i32).contiguous()
        return g, g.dim() == 2 and g.shape[0] > 1

    qg_t, qg_b = groups(qg)
    kg_t, kg_b = groups(kg)
    kr = _subset_rank(kg_t, subset_group, cu_k) if has_subset else None
    rs_b, words = False, 1
    if has_subset:
        words, rs_b = subset_shape(row_subset, varlen)
    cls = None
    if has_allow or has_subset:
        if varlen:
            qg_p = _padded_per_seq(qg_t, cu_q, nq_arg)
            kg_p = _padded_per_seq(kg_t, cu_k, nk_arg)
            kr_p = _padded_per_seq(kr, cu_k, nk_arg) if kr is not None else None
        else:
            qg_p = qg_t.long().reshape(-1, nq_arg)
            kg_p = kg_t.long().reshape(-1, nk_arg)
            kr_p = kr.long().reshape(-1, nk_arg) if kr is not None else None
        cls = _tile_table(qg_p, kg_p, kr_p, allow.to(dev) if has_allow else None, bm, bn)
    bt = max(lens_q.shape[0], lens_e.shape[0], cls.shape[0] if cls is not None else 1)
    expand = (lambda t: t.expand(bt)) if bt > 1 else (lambda t: t)
    tm, tn = triton.cdiv(max(nq_arg, 1), bm), triton.cdiv(max(nk_arg, 1), bn)
    tiles_q, tiles_k = _tile_lists(cls, expand(lens_q), expand(lens_k), expand(lens_e), tm, tn, bm, bn, causal,
                                   all_keys)
    masks = Masks(qg_t if has_allow else None, kg_t, kr, allow_bits(allow.to(dev)) if has_allow else None, None,
                  words, None)  # the row_subset words and thresholds are the call's own (subset_words)
    flags = dict(QG_B=qg_b, KG_B=kg_b, RS_B=rs_b, TAB_B=tiles_q.lst.shape[0] > 1)
    return Layout(Seqs(cu_q if varlen else None, cu_k if varlen else None, klen_t), masks, tiles_q, tiles_k,
                  nq_arg, nk_arg, flags, seg_q, refs)


def subset_shape(row_subset: Tensor, varlen: bool) -> tuple[int, bool]:
    """``(words per row, one row of words per batch)`` of a ``row_subset`` mask."""
    words = row_subset.shape[-1] if row_subset.dim() == (2 if varlen else 3) else 1
    return words, not varlen and row_subset.shape[0] > 1


def subset_words(row_subset: Tensor, varlen: bool, device: torch.device) -> Tensor:
    """``row_subset`` as int64 words ``[B|1, Nq, W]`` (packed ``[Tq, W]``): per call, since a
    learner may pick new subsets in every block while the rest of the layout stays."""
    words, _ = subset_shape(row_subset, varlen)
    rs = row_subset.to(device=device, dtype=torch.int64)
    return rs.reshape(*rs.shape[: (1 if varlen else 2)], words).contiguous()


def layout(q: Tensor, k: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor], klen: Optional[Tensor],
           qg: Optional[Tensor], kg: Optional[Tensor], allow: Optional[Tensor], row_subset: Optional[Tensor],
           causal: bool, subset_group: int, all_keys: bool, bm: int, bn: int) -> Layout:
    """The call's :class:`Layout`, from :data:`LAYOUT_CACHE` when its mask tensors were seen."""
    refs = (cu_q, cu_k, klen, qg, kg, allow)
    sizes = (q.shape[0], q.shape[2]) if cu_q is None else (q.shape[0],)
    subset = None if row_subset is None else (tuple(row_subset.shape), row_subset.device)
    key = (*map(_key, refs), subset, sizes, k.shape[0] if cu_q is not None else k.shape[2], q.device, bool(causal),
           subset_group, all_keys, bm, bn)
    hit = LAYOUT_CACHE.get(key)
    if hit is not None:
        LAYOUT_CACHE.move_to_end(key)
        return hit
    lay = _build_layout(q, k, cu_q, cu_k, klen, qg, kg, allow, row_subset, causal, subset_group, all_keys, bm, bn,
                        refs)
    LAYOUT_CACHE[key] = lay
    while len(LAYOUT_CACHE) > LAYOUT_CACHE_SIZE:
        LAYOUT_CACHE.popitem(last=False)
    return lay
