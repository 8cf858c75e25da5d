"""The block loop every tower shares: hooks before, attention spec, block, hooks after.

A tower runner (``clip.py``, ``vit.py``, ``hf_text.py``) embeds its input into a
:class:`~vlm.tokens.TokenState`, hands it to :func:`run_blocks`, then applies the library's final
norm, pooling and projection. Hooks see every block of every tower in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

from torch import Tensor

from vlm.hooks import HookList, TowerHook, active_hooks
from vlm.kernels import AttnSpec
from vlm.tokens import SCRATCH_NUM_BLOCKS, TokenState
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


class TextPrefix(Protocol):
    """What :func:`trim_text` needs from a text runner."""

    trim: bool

    def prefix_length(self, tokens: Tensor) -> Optional[int]: ...


def trim_text(
    runner: TextPrefix, tokens: Tensor, embeds: Optional[Tensor], hooks: Optional[Iterable[TowerHook]]
) -> tuple[Tensor, Optional[Tensor]]:
    """Cut ``tokens [B, L]`` (and ``embeds [B, L, D]``) to the leading positions that can change
    the pooled text feature: ``runner.prefix_length(tokens)`` (the longest prompt of the batch).

    Under a causal mask nothing after EOT reaches EOT; under a key-padding mask padding reaches
    nothing. Running the tower at the longest prompt instead of the full context (77) is then exact,
    and the positional embedding is sliced to the same length where the state is built. Kept full
    when ``runner.trim`` is off, when the runner returns ``None`` (the pooled feature may read every
    position), or when a text hook sets ``needs_full_text`` (it reads positions past the cut).
    """
    if not runner.trim or any(getattr(h, "needs_full_text", False) for h in active_hooks(hooks, "text")):
        return tokens, embeds
    n = runner.prefix_length(tokens)
    if n is None or n >= tokens.shape[1]:
        return tokens, embeds
    return tokens[:, :n], None if embeds is None else embeds[:, :n]


def start_hooks(tower: str, state: TokenState, hooks: Optional[Iterable[TowerHook]]) -> TokenState:
    return HookList(hooks, tower).start(state)


