"""The argument bundles every fused-attention kernel takes (named tuples Triton passes through).

A kernel call is ``kernel(Q, K, V, S, M, T, H, NQ, NK, scale, <outputs...>, C)``:

* :class:`View` -- a ``[B, H, N, D]`` (or packed ``[T, H, D]``) tensor and its element strides per
  batch, head and row; the head dim must be contiguous. Views take strides, so the host never
  copies a transposed or sliced q/k/v.
* :class:`Seqs` -- sequence bounds: packed ``cu_seqlens`` and/or per-batch ``k_lengths``.
* :class:`Masks` -- the semantic mask: group ids, the subset ranks, the ``allow`` bit words, the
  ``row_subset`` words and the top-k thresholds.
* :class:`Tiles` -- per query tile (or per key tile, for ``dK/dV``) the compact list of the tiles
  that run, full ones first: ``lst[b, t, :]`` holds ``cnt[b, t, 0]`` full then ``cnt[b, t, 1]``
  partial tile indices (FlexAttention's ``BlockMask`` idea). Full tiles run without any mask.
* :class:`Cfg` -- every compile-time switch as a ``tl.constexpr``, so one name carries them all.

``None`` fields (an absent tensor) reach the kernel as compile-time ``None``: no placeholder
allocation per call. Sizes (``H``, ``NQ``, ``NK``, group and probe counts) stay top-level scalar
arguments marked ``do_not_specialize``, so a new sequence length reuses the compiled kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import triton.language as tl
from torch import Tensor


class View(NamedTuple):
    """Base pointer and strides of a q/k/v-like tensor; offsets are formed in int64 in-kernel."""

    ptr: Tensor
    sb: int
    sh: int
    sn: int

    @staticmethod
    def of(t: Tensor, varlen: bool) -> "View":
        """``[B, H, N, D]`` -> strides (b, h, n); packed ``[T, H, D]`` -> (0, h, t)."""
        if varlen:
            return View(t, 0, t.stride(1), t.stride(0))
        return View(t, t.stride(0), t.stride(1), t.stride(2))


class Seqs(NamedTuple):
    """Sequence bounds: ``cu_q``/``cu_k`` int32 ``[B+1]`` (varlen) and ``k_len`` int64 ``[B]``."""

    cu_q: Optional[Tensor]
    cu_k: Optional[Tensor]
    k_len: Optional[Tensor]


class Masks(NamedTuple):
    """Semantic mask tensors (see ``triton_attn_masks``) and the per-row top-k thresholds."""

    qg: Optional[Tensor]  # int32 query group ids, [B, Nq] / [1, Nq] / packed [Tq]
    kg: Optional[Tensor]  # int32 key group ids
    kr: Optional[Tensor]  # int32 rank of each key inside subset_group, -1 outside
    allow: Optional[Tensor]  # int32 [Gq, 2] bit words
    rs: Optional[Tensor]  # int64 row_subset words, [B|1, Nq, W] / packed [Tq, W]
    rs_sn: int  # words per row
    thr: Optional[Tensor]  # fp32 per-row top-k threshold (aux layout)


class Tiles(NamedTuple):
    """Compact tile lists: ``lst [Bt, n_outer, n_inner]`` int32 and ``cnt [Bt, n_outer, 2]`` int32."""

    lst: Tensor
    cnt: Tensor


#: Fields of :class:`Cfg` (all ``tl.constexpr``).
CFG_FIELDS = (
    "VARLEN", "HAS_KLEN", "CAUSAL", "HAS_ALLOW", "HAS_SUBSET", "ALL_KEYS", "HAS_TOPK", "HAS_KG",
    "QG_B", "KG_B", "RS_B", "TAB_B", "BLOCK_M", "BLOCK_N", "HEAD_D", "UPCAST", "DOT",
    "FIXED", "HAS_EPI", "G_PAD", "WITH_DO", "SORT", "TOPK_W",
)


class Cfg(NamedTuple):
    """Compile-time switches of one call (values wrapped in ``tl.constexpr``).

    ``QG_B``/``KG_B``/``RS_B``/``TAB_B``: that array has one row per batch (else it is shared).
    ``FIXED``/``HAS_EPI``/``G_PAD``/``WITH_DO``/``SORT``/``TOPK_W`` are per-kernel switches.
    """

    VARLEN: Any
    HAS_KLEN: Any
    CAUSAL: Any
    HAS_ALLOW: Any
    HAS_SUBSET: Any
    ALL_KEYS: Any
    HAS_TOPK: Any
    HAS_KG: Any
    QG_B: Any
    KG_B: Any
    RS_B: Any
    TAB_B: Any
    BLOCK_M: Any
    BLOCK_N: Any
    HEAD_D: Any
    UPCAST: Any
    DOT: Any
    FIXED: Any
    HAS_EPI: Any
    G_PAD: Any
    WITH_DO: Any
    SORT: Any
    TOPK_W: Any

    @staticmethod
    def make(**values: Any) -> "Cfg":
        """A :class:`Cfg` from plain values (unset per-kernel switches are off)."""
        defaults = dict(FIXED=False, HAS_EPI=False, G_PAD=16, WITH_DO=False, SORT=False, TOPK_W=64)
        defaults.update(values)
        return Cfg(**{k: tl.constexpr(defaults[k]) for k in CFG_FIELDS})

    def with_(self, **values: Any) -> "Cfg":
        """A copy with some switches changed."""
        return self._replace(**{k: tl.constexpr(v) for k, v in values.items()})

    def plain(self) -> dict[str, Any]:
        """The switches as plain Python values (reports, tables)."""
        return {k: getattr(v, "value", v) for k, v in self._asdict().items()}
