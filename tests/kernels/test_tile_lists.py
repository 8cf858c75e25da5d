"""The compact tile lists of the fused attention, against a brute-force per-tile classification.

``triton_attn_layout._tile_lists`` decides, per query tile, which key tiles run and which of them run
without any mask (and, per key tile, the same for the ``dK/dV`` pass). The reference here builds
the dense ``[Nq, Nk]`` structural and semantic masks of every sequence and classifies each tile
by looking at its entries: a tile runs when it holds a denominator pair (any in-bounds pair under
``all_keys``), and is full when every pair of every row (every *existing* row for ``dK/dV``) is
in bounds and allowed. A wrong full tile would drop a mask; a missing tile would drop keys.
"""

from __future__ import annotations

import pytest
import torch

from vlm.kernels import triton_attn_layout as ops


def _dense_allowed(qg, kg, allow, kr, rs):
    """``[Nq, Nk]`` semantic mask from groups, ``allow`` and the row_subset bits, written out plainly."""
    nq, nk = qg.numel(), kg.numel()
    m = torch.ones(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            if allow is not None and not allow[qg[i], kg[j]]:
                m[i, j] = False
            if kr is not None and kr[j] >= 0 and rs is not None and not (int(rs[i]) >> int(kr[j])) & 1:
                m[i, j] = False
    return m


def _reference(nq, nk, nke, causal, sem, bm, bn, all_keys):
    """Per tile: runs / full for the query-tile lists / full for the key-tile (dK/dV) lists."""
    tm, tn = -(-nq // bm), -(-nk // bn)
    rows = torch.arange(tm * bm)[:, None].expand(-1, tn * bn)
    cols = torch.arange(tn * bn)[None, :].expand(tm * bm, -1)
    bounds = cols < nke  # padding and causality, as formulas over every row of a tile
    if causal:
        bounds = bounds & (cols <= rows + (nk - nq))
    inb = bounds & (rows < nq)
    sem_p = torch.zeros(tm * bm, tn * bn, dtype=torch.bool)
    sem_p[:nq, :nk] = sem
    run, full_q, full_k = (torch.zeros(tm, tn, dtype=torch.bool) for _ in range(3))
    for i in range(tm):
        for j in range(tn):
            t = (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
            denom = inb[t] if all_keys else inb[t] & sem_p[t]
            run[i, j] = bool(denom.any())
            rows_here = min(bm, nq - i * bm)  # rows past nq: computed and discarded in the query passes
            full_q[i, j] = run[i, j] and bool(bounds[t].all()) and bool(sem_p[t][:rows_here].all())
            full_k[i, j] = full_q[i, j] and (i + 1) * bm <= nq  # dK/dV sums over rows: all must exist
    return run, full_q, full_k


def _unpack(tiles: ops.Tiles, b: int):
    lst, cnt = tiles.lst[min(b, tiles.lst.shape[0] - 1)], tiles.cnt[min(b, tiles.cnt.shape[0] - 1)]
    full = torch.zeros(lst.shape, dtype=torch.bool)
    run = torch.zeros(lst.shape, dtype=torch.bool)
    for t in range(lst.shape[0]):
        nf, npart = int(cnt[t, 0]), int(cnt[t, 1])
        full[t, lst[t, :nf].long()] = True
        run[t, lst[t, : nf + npart].long()] = True
        assert len(set(lst[t, : nf + npart].tolist())) == nf + npart  # no tile twice
    return run, full


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("all_keys", [False, True])
@pytest.mark.parametrize("nq,nk", [(70, 70), (40, 90), (90, 90), (90, 40)])
def test_tile_lists_match_bruteforce(causal, all_keys, nq, nk):
    gen = torch.Generator().manual_seed(nq * 7 + nk)
    bm, bn = 16, 16
    kg = torch.randint(0, 3, (nk,), generator=gen)
    kg[:40] = 0  # a run of one group: some tiles are full
    qg = torch.randint(0, 2, (nq,), generator=gen)
    qg[:30] = 0
    allow = torch.tensor([[True, True, False], [True, False, True]])
    klen = torch.tensor([nk, nk - 23])
    for subset in (False, True):
        kr = ops._subset_rank(kg.int(), 2, None) if subset else None
        rs = torch.randint(0, 2 ** 20, (nq,), generator=gen) if subset else None
        lay = ops.layout(torch.zeros(2, 1, nq, 16), torch.zeros(2, 1, nk, 16), None, None, klen, qg[None], kg[None],
                         allow, rs[None, :, None] if subset else None, causal, 2, all_keys, bm, bn)
        sem = _dense_allowed(qg, kg, allow, kr, rs)
        for b in range(2):
            run, full_q, full_k = _reference(nq, nk, int(klen[b]), causal, sem, bm, bn, all_keys)
            got_run, got_full = _unpack(lay.tiles_q, b)
            assert torch.equal(got_run, run), (b, subset)
            assert torch.equal(got_full, full_q), (b, subset)
            got_run_k, got_full_k = _unpack(lay.tiles_k, b)
            assert torch.equal(got_run_k, run.T), (b, subset)
            assert torch.equal(got_full_k, full_k.T), (b, subset)
        assert full_q.any() or causal  # the cases do exercise the unmasked path


def test_layout_is_cached_per_mask_tensors_and_rebuilt_after_in_place_edit():
    qg = torch.zeros(1, 50, dtype=torch.long)
    allow = torch.ones(1, 1, dtype=torch.bool)
    q = torch.zeros(1, 1, 50, 16)
    args = (q, q, None, None, None, qg, qg, allow, None, False, -1, False, 16, 16)
    first = ops.layout(*args)
    assert ops.layout(*args) is first
    allow[0, 0] = False  # in place: the version counter moves, the cached lists are stale
    again = ops.layout(*args)
    assert again is not first and int(again.tiles_q.cnt.sum()) == 0
