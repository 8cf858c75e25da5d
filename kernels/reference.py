"""Plain-PyTorch masked attention: the executable definition of every :class:`AttnSpec` field.

This path builds dense ``[B, H, Nq, Nk]`` masks and computes each normalisation literally, so it
is slow but obvious. The fused Triton kernel and the SDPA fast path are tested against it (in
float64). Rows that may attend to no key output 0 (plus ``epilogue_add``) with ``lse = -inf``
and finite gradients.

Mask application order (docs/contracts.md, "AttnSpec"):
  * *structural* masks: ``k_lengths`` and ``causal`` (and ``topk``) always remove keys from the
    denominator;
  * *semantic* masks: ``allow`` (group structure) and ``row_subset`` remove keys from the
    denominator under ``softmax``/``segmented``, but under ``all_keys`` they only zero the final
    weights (no renormalisation, gradients still flow through the normaliser).
  * ``topk`` keeps, per row, the keys whose logit is >= the k-th largest logit among the keys in
    the row's denominator set (ties keep all) and drops the others from it: for ``softmax`` and
    ``segmented`` that set is what all other masks allow, for ``all_keys`` the structural set.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from vlm.kernels.spec import AttnOutput, AttnSpec


def _expand_groups(groups: Tensor, batch: int) -> Tensor:
    """``[N]`` or ``[B, N]`` group ids -> ``[B, N]`` long."""
    groups = groups.long()
    return groups.expand(batch, -1) if groups.dim() == 1 else groups


def subset_rank(k_groups: Tensor, subset_group: int) -> Tensor:
    """Index of each key among the keys of ``subset_group`` (in key order); -1 for other keys."""
    in_group = k_groups == subset_group
    return torch.where(in_group, in_group.long().cumsum(-1) - 1, torch.full_like(k_groups, -1))


def row_subset_mask(row_subset: Tensor, k_groups: Tensor, subset_group: int) -> Tensor:
    """Dense ``[B, Nq, Nk]`` bool mask from the ``row_subset`` bitmask (True = may attend).

    Keys outside ``subset_group`` are unaffected (True). For key of rank m in the group, the bit
    ``m % 64`` of word ``m // 64`` of the row's mask decides.
    """
    bits = row_subset if row_subset.dim() == 3 else row_subset.unsqueeze(-1)  # [B, Nq, W]
    rank = subset_rank(k_groups, subset_group)  # [B, Nk]
    safe = rank.clamp(min=0)
    word = torch.gather(
        bits, 2, (safe // 64).unsqueeze(1).expand(-1, bits.shape[1], -1)
    )  # [B, Nq, Nk]
    bit = (word >> (safe % 64).unsqueeze(1)) & 1
    return torch.where((rank >= 0).unsqueeze(1), bit.bool(), torch.ones_like(bit, dtype=torch.bool))


def structural_mask(spec: AttnSpec, b: int, nq: int, nk: int, device) -> Tensor:
    """``[B, 1, Nq, Nk]`` bool: padding (k_lengths) and causal."""
    mask = torch.ones(b, 1, nq, nk, dtype=torch.bool, device=device)
    if spec.k_lengths is not None:
        keys = torch.arange(nk, device=device)
        mask = mask & (keys[None, :] < spec.k_lengths.to(device)[:, None])[:, None, None, :]
    if spec.causal:
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        mask = mask & (j <= i + (nk - nq))
    return mask


def semantic_mask(spec: AttnSpec, b: int, nq: int, nk: int, device) -> Tensor:
    """``[B, 1, Nq, Nk]`` bool: group allow matrix and row_subset bitmask."""
    mask = torch.ones(b, 1, nq, nk, dtype=torch.bool, device=device)
    if spec.q_groups is not None:
        qg = _expand_groups(spec.q_groups.to(device), b)
        kg = _expand_groups(spec.k_groups.to(device), b)
        if spec.allow is not None:
            allow = spec.allow.to(device)
            mask = mask & allow[qg[:, :, None], kg[:, None, :]][:, None]
        if spec.row_subset is not None:
            rs = row_subset_mask(spec.row_subset.to(device), kg, spec.subset_group)
            mask = mask & rs[:, None]
    return mask


def topk_mask(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Keep keys whose score is >= the k-th largest allowed score of their row (ties keep all)."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    kk = min(k, scores.shape[-1])
    kth = masked.topk(kk, dim=-1).values[..., -1:]
    return allowed & (masked >= kth)


def _safe_softmax(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over masked keys; returns (weights, lse). Empty rows give zeros and -inf."""
    neg = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~mask, neg)
    m = masked.amax(dim=-1, keepdim=True).detach()
    e = torch.exp(masked - m) * mask
    denom = e.sum(dim=-1, keepdim=True)
    has = denom > 0
    safe = torch.where(has, denom, torch.ones_like(denom))
    p = e / safe
    lse = torch.where(has, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return p, lse.squeeze(-1)


def _segmented(scores: Tensor, mask: Tensor, spec: AttnSpec, b: int) -> tuple[Tensor, Tensor]:
    """Segmented normalisation: one normaliser per key group, recombined by a gate."""
    kg = _expand_groups(spec.k_groups.to(scores.device), b)  # [B, Nk]
    num_groups = spec.allow.shape[1] if spec.allow is not None else int(kg.max()) + 1
    onehot = torch.nn.functional.one_hot(kg, num_groups).to(scores.dtype)  # [B, Nk, G]
    neg = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~mask, neg)
    m = masked.amax(dim=-1, keepdim=True).detach()  # one shift for all groups is exact
    e = torch.exp(masked - m) * mask  # [B, H, Nq, Nk]
    z = torch.einsum("bhqk,bkg->bhqg", e, onehot)  # per-group sums
    total = z.sum(-1, keepdim=True)
    has_group = z > 0
    safe_z = torch.where(has_group, z, torch.ones_like(z))
    if spec.segment_gate is None:
        gate = z / torch.where(total > 0, total, torch.ones_like(total))
    else:
        gate = torch.as_tensor(spec.segment_gate, dtype=scores.dtype, device=scores.device)
        gate = gate.expand_as(z) * has_group
    coeff = gate / safe_z  # [B, H, Nq, G]
    p = e * torch.einsum("bhqg,bkg->bhqk", coeff, onehot)
    has = total > 0
    lse = torch.where(
        has, m + torch.log(torch.where(has, total, torch.ones_like(total))), torch.full_like(m, float("-inf"))
    )
    return p, lse.squeeze(-1)


def attention_weights(q: Tensor, k: Tensor, spec: AttnSpec) -> tuple[Tensor, Tensor]:
    """Final attention weights ``[B, H, Nq, Nk]`` and ``lse [B, H, Nq]`` for padded input."""
    b, _, nq, d = q.shape
    nk = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = spec.scale if spec.scale is not None else d ** -0.5
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    if nk == 0:  # no key at all: every row outputs 0 with lse = -inf
        return scores, torch.full(scores.shape[:-1], float("-inf"), dtype=compute, device=q.device)
    struct = structural_mask(spec, b, nq, nk, q.device)
    sem = semantic_mask(spec, b, nq, nk, q.device)
    if spec.normalize == "all_keys":
        denom_mask = struct.expand_as(scores)
        if spec.topk is not None:
            denom_mask = topk_mask(scores, denom_mask, spec.topk)
        p, lse = _safe_softmax(scores, denom_mask)
        return p * sem, lse
    mask = (struct & sem).expand_as(scores)
    if spec.topk is not None:
        mask = topk_mask(scores, mask, spec.topk)
    if spec.normalize == "segmented":
        if spec.k_groups is None:
            raise ValueError("normalize='segmented' needs k_groups (the key segments).")
        return _segmented(scores, mask, spec, b)
    return _safe_softmax(scores, mask)


def _padded_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> AttnOutput:
    p, lse = attention_weights(q, k, spec)
    out = p @ v.to(p.dtype)
    if spec.epilogue_add is not None:
        out = out + spec.epilogue_add.to(out.dtype)[:, :, None, :]
    probes: Optional[Tensor] = None
    if spec.probe_rows is not None:
        probes = p[:, :, spec.probe_rows.to(q.device)].float()
    return AttnOutput(out.to(q.dtype), lse.float(), probes)


def per_sequence_attention(
    q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, inner: Optional[Callable[..., AttnOutput]] = None
) -> AttnOutput:
    """Packed input ``[T, H, D]``: run each sequence as a batch of one through ``inner`` (the
    reference by default; dispatch passes ``attention`` so that each sequence takes its own fused
    route where no varlen kernel runs) and repack."""
    inner = inner or _padded_attention
    cq, ck = spec.cu_seqlens_q.tolist(), spec.cu_seqlens_k.tolist()
    outs, lses, probes = [], [], []
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:  # a sequence with no query contributes nothing
            continue
        qi = q[cq[i] : cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i] : ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i] : ck[i + 1]].transpose(0, 1)[None]
        sub = spec.replace(
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            k_lengths=None,
            q_groups=None if spec.q_groups is None else spec.q_groups[cq[i] : cq[i + 1]],
            k_groups=None if spec.k_groups is None else spec.k_groups[ck[i] : ck[i + 1]],
            allow=spec.allow,
            row_subset=None if spec.row_subset is None else spec.row_subset[None, cq[i] : cq[i + 1]],
            epilogue_add=None if spec.epilogue_add is None else spec.epilogue_add[i : i + 1],
            probe_mean_query=False,  # the caller computes it for the whole pack
        )
        o = inner(qi, ki, vi, sub)
        outs.append(o.out[0].transpose(0, 1))
        lses.append(o.lse[0].transpose(0, 1))
        if o.probes is not None:
            probes.append(o.probes[0])
    return AttnOutput(
        torch.cat(outs, 0), torch.cat(lses, 0), probes if probes else None  # type: ignore[arg-type]
    )


def mean_query_weights(q: Tensor, k: Tensor, spec: AttnSpec) -> Union[Tensor, list[Tensor]]:
    """``AttnSpec.probe_mean_query``: per sample (per packed sequence), the mean ``q_bar`` of its
    valid query rows and ``softmax_j(scale * q_bar . k_j)`` over its non-padding keys, fp32.
    ``[B, H, Nk]``, or for packed input a list of ``[H, Nk_i]``. O(N d) per head: no attention
    matrix. With ``k_lengths``, a sample's valid query rows are its first ``k_lengths - (Nk - Nq)``
    (key/value-only keys have no query row; padding comes last)."""
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    if spec.is_varlen:
        cq, ck = spec.cu_seqlens_q.tolist(), spec.cu_seqlens_k.tolist()
        out = []
        for i in range(len(cq) - 1):
            qi, ki = q[cq[i] : cq[i + 1]].float(), k[ck[i] : ck[i + 1]].float()  # [N, H, d]
            logits = torch.einsum("hd,nhd->hn", qi.mean(0), ki) * scale
            out.append(logits.softmax(-1))
        return out
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    qf, kf = q.float(), k.float()
    if spec.k_lengths is None:
        q_bar = qf.mean(2)
        key_ok = None
    else:
        lengths = spec.k_lengths.to(q.device)
        rows = (torch.arange(nq, device=q.device)[None] < (lengths - (nk - nq))[:, None]).to(qf.dtype)  # [B, Nq]
        q_bar = (qf * rows[:, None, :, None]).sum(2) / rows.sum(1).clamp(min=1)[:, None, None]
        key_ok = torch.arange(nk, device=q.device)[None] < lengths[:, None]
    logits = torch.einsum("bhd,bhnd->bhn", q_bar, kf) * scale
    if key_ok is not None:
        logits = logits.masked_fill(~key_ok[:, None], float("-inf"))
    return logits.softmax(-1)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: Optional[AttnSpec] = None) -> AttnOutput:
    """Masked attention by definition. ``q [B, H, Nq, D]``, ``k, v [B, H, Nk, D]``.

    For packed varlen input (``spec.cu_seqlens_q/k``), ``q [Tq, H, D]``, ``k, v [Tk, H, D]``;
    group ids are then packed ``[T]`` as well, ``row_subset`` is ``[Tq]`` (or ``[Tq, W]``), and
    ``probes`` is a list of per-sequence ``[H, P, Nk_i]`` tensors.
    """
    spec = spec or AttnSpec()
    if spec.is_varlen:
        return per_sequence_attention(q, k, v, spec)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q, k, v as [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}.")
    return _padded_attention(q, k, v, spec)
