"""Token types and the per-tower token state that flows through the block loop."""

from __future__ import annotations

import dataclasses
from enum import IntEnum
from typing import Any, Optional

import torch
from torch import Tensor


def check(ok: Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless every element of ``ok`` (bool) is true.

    For checks in the block loop: on CPU the check is immediate (there is no device to wait on);
    on an accelerator it is ``torch._assert_async``, which does not make the host wait for the
    device (a failure surfaces as a device-side assert at the next synchronisation).
    """
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            raise error(message)
    else:
        torch._assert_async(ok.all(), f"{error.__name__}: {message}")


class TokenType(IntEnum):
    """What a token is. Stored as int8 per token; new members go at the end (saved checkpoints and
    exports store the numbers; docs/contracts.md)."""

    CLS = 0
    PATCH = 1
    REGISTER = 2
    PROMPT = 3
    PROMPT_CLS = 4
    PROMPT_IMG = 5
    TEXT = 6
    CTX = 7
    EOT = 8
    PAD = 9
    SOS = 10


@dataclasses.dataclass
class TokenState:
    """The residual stream of one tower for one forward pass, plus what hooks need to know.

    x:         ``[B, N, D]`` residual stream.
    types:     int8 ``[N]`` or ``[B, N]`` TokenType of each token.
    lengths:   long ``[B]`` valid tokens per sample (valid tokens first), or ``None`` if all valid.
    positions: long ``[B, N]`` index in the tower's original sequence; -1 for inserted tokens.
    kv_only:   bool ``[N]``: tokens that are only keys/values (no query, no MLP, dropped after
               the block by the runner).

    Hooks keep their per-pass state in typed objects of their own (``vlm.context``), not here.
    """

    x: Tensor
    types: Tensor
    lengths: Optional[Tensor] = None
    positions: Optional[Tensor] = None
    kv_only: Optional[Tensor] = None

    @classmethod
    def create(cls, x: Tensor, types: Tensor, lengths: Optional[Tensor] = None) -> "TokenState":
        """A fresh state whose positions are 0..N-1 (every token is an original one)."""
        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device).expand(b, n)
        return cls(x=x, types=types.to(torch.int8), lengths=lengths, positions=positions)

    @property
    def batch_types(self) -> Tensor:
        """``types`` as ``[B, N]``."""
        return self.types.expand(self.x.shape[0], -1) if self.types.dim() == 1 else self.types

    def replace(self, **changes: Any) -> "TokenState":
        return dataclasses.replace(self, **changes)

    # --- masks and pooling: what towers, learners and pruners read off the state ---------------
    def valid_mask(self) -> Tensor:
        """``[B, N]`` bool: tokens before each sample's length."""
        b, n, _ = self.x.shape
        if self.lengths is None:
            return torch.ones(b, n, dtype=torch.bool, device=self.x.device)
        return torch.arange(n, device=self.x.device)[None] < self.lengths[:, None]

    def type_mask(self, *types: "TokenType") -> Tensor:
        """``[B, N]`` bool: valid tokens whose type is one of ``types``."""
        t = self.batch_types
        m = torch.zeros_like(t, dtype=torch.bool)
        for ty in types:
            m |= t == int(ty)
        return m & self.valid_mask()

    def first_of_type(self, ty: "TokenType") -> Tensor:
        """``[B, D]`` the first token of type ``ty`` in each sample (e.g. CLS, EOT)."""
        m = self.type_mask(ty)
        check(m.any(1), f"Pooling needs a {ty.name} token in every sample, but some have none.")
        idx = m.int().argmax(1)
        return self.x[torch.arange(self.x.shape[0], device=self.x.device), idx]

    def insert(self, index: int, tokens: Tensor, types: Tensor | int, kv_only: bool = False) -> "TokenState":
        """Insert ``tokens [B or 1, P, D]`` before sequence position ``index``.

        Inserted tokens get position -1. ``lengths`` grows by P (inserted tokens are valid and
        are placed before any padding, so ``index`` must not exceed the shortest length).
        """
        b = self.x.shape[0]
        p = tokens.shape[1]
        tokens = tokens.to(self.x.dtype).expand(b, -1, -1)
        new_types = torch.as_tensor(types, dtype=torch.int8, device=self.x.device)
        if new_types.dim() == 0:
            new_types = new_types.expand(p)
        if self.types.dim() == 2:
            new_types = new_types.expand(b, p)
        x = torch.cat([self.x[:, :index], tokens, self.x[:, index:]], dim=1)
        types_all = torch.cat([self.types[..., :index], new_types, self.types[..., index:]], dim=-1)
        pos_new = torch.full((b, p), -1, dtype=torch.long, device=self.x.device)
        positions = None
        if self.positions is not None:
            positions = torch.cat([self.positions[:, :index], pos_new, self.positions[:, index:]], dim=1)
        kv = self.kv_only
        if kv is not None or kv_only:
            old = kv if kv is not None else torch.zeros(self.x.shape[1], dtype=torch.bool, device=self.x.device)
            new = torch.full((p,), kv_only, dtype=torch.bool, device=self.x.device)
            kv = torch.cat([old[:index], new, old[index:]])
        lengths = None if self.lengths is None else self.lengths + p
        return self.replace(x=x, types=types_all, positions=positions, kv_only=kv, lengths=lengths)

    def select(self, index: Tensor) -> "TokenState":
        """Keep tokens ``index [B, K]`` (per sample, in the given order), e.g. after pruning."""
        b, k = index.shape
        x = torch.gather(self.x, 1, index[..., None].expand(b, k, self.x.shape[-1]))
        types = torch.gather(self.batch_types, 1, index)
        positions = None if self.positions is None else torch.gather(self.positions, 1, index)
        if self.kv_only is not None:
            check(~self.kv_only, "TokenState.select: drop key/value-only tokens before selecting.")
        return self.replace(x=x, types=types, positions=positions, kv_only=None)

    def query_index(self) -> Tensor | None:
        """long ``[Nq]``: the tokens that are queries (not key/value-only), or None if all are."""
        if self.kv_only is None:
            return None
        return (~self.kv_only).nonzero().flatten()  # sync: the number of query tokens is a shape

    def drop_kv_only(self, x: Optional[Tensor] = None, keep: Tensor | None = None) -> "TokenState":
        """Remove key/value-only tokens (the tower runner does this after every block).

        ``x``, if given, is the new residual of the remaining (query) tokens; by default the
        current residual is sliced. ``keep``, if given, is :meth:`query_index` (already computed).
        """
        if self.kv_only is None:
            return self.replace(x=self.x if x is None else x, kv_only=None)
        keep = self.query_index() if keep is None else keep
        dropped = self.kv_only.numel() - keep.numel()
        if dropped == 0:
            return self.replace(x=self.x if x is None else x, kv_only=None)
        lengths = None if self.lengths is None else self.lengths - dropped
        positions = None if self.positions is None else self.positions.index_select(1, keep)
        return self.replace(
            x=self.x.index_select(1, keep) if x is None else x,
            types=self.types.index_select(self.types.dim() - 1, keep),
            positions=positions,
            kv_only=None,
            lengths=lengths,
        )


def kept_first(keep: Tensor, width: int) -> Tensor:
    """long ``[B, width]``: per row, the indices where ``keep [B, N]`` is True, in order, followed
    by the others (also in order); ``width`` is usually the widest row's kept count. The one
    compaction rule for cuts and repacks: a stable sort of ``~keep``."""
    return torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]


def prefix_length(types: Tensor, who: str) -> int:
    """The length of the CLS/register prefix of ``types [B, N]``, which must be the same leading
    run in every sample (prompts are inserted right after it)."""
    n = int(((types == int(TokenType.CLS)) | (types == int(TokenType.REGISTER)))[0].sum())  # sync: a shape
    check_prefix(types, n, who)
    return n


def check_prefix(types: Tensor, n: int, who: str) -> None:
    """Check (asynchronously on an accelerator) that the first ``n`` tokens of every sample, and
    only those, are CLS/register tokens."""
    is_prefix = (types == int(TokenType.CLS)) | (types == int(TokenType.REGISTER))
    check(
        is_prefix[:, :n].all(1) & (is_prefix.sum(1) == n),
        f"{who}: the CLS/register tokens must form a common prefix of the sequence.",
    )


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, N, D]`` over tokens where ``mask [B, N]``."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max of ``x [B, N, D]`` over tokens where ``mask [B, N]``."""
    return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
