"""The block loop every tower shares: hooks before, attention spec, block, hooks after.

A tower runner (``clip.py``, ``vit.py``, ``hf_text.py``) embeds its input into a
:class:`~vlm.tokens.TokenState`, hands it to :func:`run_blocks`, then applies the library's final
norm, pooling and projection. Hooks see every block of every tower in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from vlm.hooks import HookList, TowerHook
from vlm.kernels import AttnSpec
from vlm.tokens import SCRATCH_NUM_BLOCKS, TokenState, TokenType
from vlm.towers.blocks import BlockAdapter


@dataclass
class TowerOutput:
    """``pooled``: the tower's embedding (after projection); ``state``: the final token state
    (after the final norm, before pooling), for methods that read tokens."""

    pooled: Tensor
    state: TokenState


def run_blocks(
    tower: str,
    blocks: Sequence[BlockAdapter],
    state: TokenState,
    hooks: Optional[Iterable[TowerHook]],
    causal: bool = False,
) -> TokenState:
    """Run ``blocks`` over ``state`` with ``hooks`` (already past ``on_tower_start``)."""
    hl = HookList(hooks, tower)
    state.scratch[SCRATCH_NUM_BLOCKS] = len(blocks)
    for i, block in enumerate(blocks):
        state = hl.before(i, state)
        spec = AttnSpec(causal=causal, k_lengths=state.lengths)
        spec = hl.spec(i, state, spec)
        state, out = block(state, spec)
        state = hl.after(i, state, out)
    return hl.end(state)


def start_hooks(tower: str, state: TokenState, hooks: Optional[Iterable[TowerHook]]) -> TokenState:
    return HookList(hooks, tower).start(state)


def valid_mask(state: TokenState) -> Tensor:
    """``[B, N]`` bool: tokens before each sample's length."""
    b, n, _ = state.x.shape
    if state.lengths is None:
        return torch.ones(b, n, dtype=torch.bool, device=state.x.device)
    return torch.arange(n, device=state.x.device)[None] < state.lengths[:, None]


def type_mask(state: TokenState, *types: TokenType) -> Tensor:
    """``[B, N]`` bool: valid tokens whose type is one of ``types``."""
    t = state.batch_types
    m = torch.zeros_like(t, dtype=torch.bool)
    for ty in types:
        m |= t == int(ty)
    return m & valid_mask(state)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, N, D]`` over tokens where ``mask [B, N]``."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)


def first_of_type(state: TokenState, ty: TokenType) -> Tensor:
    """``[B, D]`` the first token of type ``ty`` in each sample (e.g. CLS, EOT)."""
    m = type_mask(state, ty)
    if not bool(m.any(1).all()):
        raise ValueError(f"Pooling needs a {ty.name} token in every sample, but some have none.")
    idx = m.int().argmax(1)
    return state.x[torch.arange(state.x.shape[0], device=state.x.device), idx]
