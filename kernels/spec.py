"""The declarative attention contract: :class:`AttnSpec` and :class:`AttnOutput`.

Every attention call in `vlm` is ``attention(q, k, v, spec)``. The spec says *what* attention
to compute (masks, normalisation, probes); the backends in this package decide *how*.
Field semantics are written out in ``docs/contracts.md``; ``reference.py`` is their executable
definition.
"True" always means "may attend".
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

NORMALIZE_MODES = ("softmax", "all_keys", "segmented")


class AttnOutput(NamedTuple):
    """Result of one attention call.

    out:    ``[B, H, Nq, D]`` in q's dtype (``[Tq, H, D]`` for packed varlen input).
    lse:    ``[B, H, Nq]`` fp32, log of the softmax denominator as defined by ``normalize``.
    probes: ``[B, H, P, Nk]`` fp32 final attention weights of ``spec.probe_rows``, or ``None``.
    values: ``v`` as given (``[B, H, Nk, D]``, a reference, no copy) when ``spec.return_values``,
            else ``None``: what a scoring hook needs of the values without re-projecting them.
    mean_probe: ``[B, H, Nk]`` fp32 (packed input: one ``[H, Nk_i]`` per sequence) when
            ``spec.probe_mean_query``: the softmax weights of each sample's mean query over its
            keys, a global query for towers without a CLS token; else ``None``.
    """

    out: Tensor
    lse: Tensor
    probes: Optional[Tensor] = None
    values: Optional[Tensor] = None
    mean_probe: Optional[Union[Tensor, list]] = None


@dataclasses.dataclass(frozen=True, eq=False)
class AttnSpec:
    """What attention a block must run. All fields optional; docs/contracts.md has the shapes.

    k_lengths:    long ``[B]``; keys at index >= length are padding (never attended).
    cu_seqlens_q/k: int32 ``[B+1]``; packed varlen sequences (FlashAttention semantics).
    causal:       query i sees key j iff ``j <= i + (Nk - Nq)`` (bottom-right aligned).
    q_groups/k_groups: int ``[N]`` or ``[B, N]``; group id of each token.
    allow:        bool ``[Gq, Gk]``; query group a may attend key group b.
    subset_group: the key group that ``row_subset`` indexes into.
    row_subset:   int64 ``[B, Nq]`` (or ``[B, Nq, W]`` words for groups over 64 keys); bit m set
                  means the query may attend the m-th key of ``subset_group`` in key order.
    normalize:    ``softmax`` | ``all_keys`` | ``segmented``.
    segment_gate: gate per key group for ``segmented``, broadcastable to ``[B, H, Nq, Gk]``;
                  ``None`` is the exact gate ``Z_g / sum Z`` which reproduces ``softmax``.
    topk:         keep, per row, keys whose logit >= the row's k-th largest allowed logit.
    epilogue_add: ``[B, H, D]`` added to every output row after normalisation.
    probe_rows:   long ``[P]``; rows whose final weights are returned in ``AttnOutput.probes``.
    scale:        logit scale; ``None`` means ``D ** -0.5``.
    return_values: hand ``v`` back in ``AttnOutput.values`` (it changes nothing in the product).
    probe_mean_query: return in ``AttnOutput.mean_probe`` the weights of the mean of each sample's
                  valid query rows, ``softmax_j(scale * mean_i(q_i) . k_j)`` over its non-padding
                  keys (no other mask applies; it is not a row of the product).
    """

    k_lengths: Optional[Tensor] = None
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    causal: bool = False
    q_groups: Optional[Tensor] = None
    k_groups: Optional[Tensor] = None
    allow: Optional[Tensor] = None
    subset_group: Optional[int] = None
    row_subset: Optional[Tensor] = None
    normalize: str = "softmax"
    segment_gate: Optional[Union[Tensor, float]] = None
    topk: Optional[int] = None
    epilogue_add: Optional[Tensor] = None
    probe_rows: Optional[Tensor] = None
    scale: Optional[float] = None
    return_values: bool = False
    probe_mean_query: bool = False

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(
                f"AttnSpec.normalize={self.normalize!r} is not one of {NORMALIZE_MODES}."
            )
        if (self.q_groups is None) != (self.k_groups is None) or (
            self.allow is not None and self.q_groups is None
        ):
            raise ValueError("AttnSpec: q_groups, k_groups and allow must be given together.")
        if self.row_subset is not None and self.subset_group is None:
            raise ValueError("AttnSpec.row_subset needs subset_group (the key group it indexes).")
        if self.row_subset is not None and self.k_groups is None:
            raise ValueError("AttnSpec.row_subset needs k_groups to locate subset_group's keys.")
        if (self.cu_seqlens_q is None) != (self.cu_seqlens_k is None):
            raise ValueError("AttnSpec: cu_seqlens_q and cu_seqlens_k must be given together.")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"AttnSpec.topk must be >= 1, got {self.topk}.")
        if self.probe_mean_query and self.causal:
            raise ValueError("AttnSpec.probe_mean_query: a mean query has no position, so it cannot be causal.")
        if self.segment_gate is not None and self.normalize != "segmented":
            raise ValueError("AttnSpec.segment_gate is only meaningful with normalize='segmented'.")

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def is_plain(self) -> bool:
        """True when the spec is ordinary softmax attention with at most padding and causal."""
        return (
            self.q_groups is None
            and self.row_subset is None
            and self.normalize == "softmax"
            and self.topk is None
            and self.epilogue_add is None
        )

    def replace(self, **changes) -> "AttnSpec":
        """``dataclasses.replace`` as a method, for hooks refining a tower's default spec."""
        return dataclasses.replace(self, **changes)


def group_allow_matrix(pairs: dict[int, list[int]], num_groups: int, device=None) -> Tensor:
    """Build a bool ``[G, G]`` allow matrix from ``{query_group: [key_groups...]}``."""
    allow = torch.zeros(num_groups, num_groups, dtype=torch.bool, device=device)
    for q, ks in pairs.items():
        allow[q, ks] = True
    return allow
