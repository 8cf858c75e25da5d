"""The block loop every tower shares: hooks before, attention spec, block, hooks after.

A tower runner (``clip.py``, ``vit.py``, ``hf_text.py``) embeds its input into a
:class:`~vlm.tokens.TokenState`, hands it to a :class:`TowerPass`, then applies the library's final
norm, pooling and projection. Hooks see every block of every tower in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from vlm.context import BlockContext, Tower, TowerContext
from vlm.hooks import TowerHook, active_hooks
from vlm.kernels import AttnOutput, AttnSpec
from vlm.tokens import TokenState
from vlm.towers.blocks import BlockAdapter


@dataclass
class TowerOutput:
    """``pooled``: the tower's embedding (after projection); ``state``: the final token state
    (after the final norm, before pooling), for methods that read tokens."""

    pooled: Tensor
    state: TokenState


class TowerPass:
    """One pass of one tower with its hooks: ``start`` after embedding, then ``run`` the blocks.

    It opens the pass's :class:`~vlm.context.TowerContext` (fresh per-hook state), and hands each
    hook, for every block, the block's :class:`~vlm.context.BlockContext`.
    """

    def __init__(
        self,
        tower: Tower,
        blocks: Sequence[BlockAdapter],
        hooks: Optional[Iterable[TowerHook]],
        image_index: Optional[Tensor] = None,
        token_group: int = 1,
    ) -> None:
        self.blocks = blocks
        self.hooks = active_hooks(hooks, tower)
        self.ctx = TowerContext(tower, len(blocks), image_index, token_group=token_group)

    def start(self, state: TokenState) -> TokenState:
        """``on_tower_start`` of every hook, in order (after embedding, before block 0)."""
        for h in self.hooks:
            state = h.on_tower_start(self.ctx, state)
        return state

    def run(self, state: TokenState, causal: bool = False) -> TokenState:
        """Every block with the hooks around it, then ``on_tower_end``."""
        hooks = self.hooks
        for i, block in enumerate(self.blocks):
            ctx = self.ctx.at(i, block)
            for h in hooks:
                state = h.before_block(ctx, state)
            spec = AttnSpec(causal=causal, k_lengths=state.lengths)
            for h in hooks:
                spec = h.attention_spec(ctx, state, spec)
            state, out = block(state, spec)
            for h in hooks:
                state = h.after_block(ctx, state, out)
        for h in hooks:
            state = h.on_tower_end(self.ctx, state)
        return state


class TextPrefix(Protocol):
    """What :func:`trim_text` needs from a text runner."""

    trim: bool

    def prefix_length(self, tokens: Tensor) -> Optional[int]: ...


class TextRunner(ABC):
    """What the text runners share (``clip.py``, ``hf_text.py``, ``hf_clip_text.py``,
    ``hf_siglip.py``): the call, trimming then one pass then pooling. A runner sets ``tower``,
    ``blocks``, ``causal`` and ``trim`` and implements ``embed``, ``prefix_length`` and ``pool``."""

    tower = Tower.TEXT
    blocks: Sequence[BlockAdapter]
    causal: bool = False
    trim: bool = False

    @abstractmethod
    def embed(self, tokens: Tensor, embeds: Optional[Tensor] = None) -> TokenState:
        """The token state before the first block (``embeds`` replace the token embeddings)."""

    def prefix_length(self, tokens: Tensor) -> Optional[int]:
        """The leading positions that can change the pooled feature (None: all; ``trim_text``)."""
        return None

    @abstractmethod
    def pool(self, state: TokenState, project: bool = True) -> Tensor:
        """The pooled feature of the final state (through the text projection when ``project``)."""

    def __call__(
        self,
        tokens: Tensor,
        hooks: Optional[Iterable[TowerHook]] = None,
        embeds: Optional[Tensor] = None,
        project: bool = True,
    ) -> TowerOutput:
        """``embeds [B, L, D]`` replace the token embeddings (learned context); ``project=False``
        returns the pooled feature before the text projection."""
        tokens, embeds = trim_text(self, tokens, embeds, hooks)
        run = TowerPass(self.tower, self.blocks, hooks)
        state = run.run(run.start(self.embed(tokens, embeds)), causal=self.causal)
        return TowerOutput(self.pool(state, project), state)


def last_original(x: Tensor, state: TokenState) -> Tensor:
    """``x [B, N, D]`` at each row's last original token (the largest ``state.positions``; inserted
    tokens have -1): the pooled position of a tower that pools the last one (SigLIP)."""
    if state.positions is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), state.positions.argmax(1)]


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
    if not runner.trim or any(getattr(h, "needs_full_text", False) for h in active_hooks(hooks, Tower.TEXT)):
        return tokens, embeds
    n = runner.prefix_length(tokens)
    if n is None or n >= tokens.shape[1]:
        return tokens, embeds
    return tokens[:, :n], None if embeds is None else embeds[:, :n]


class PositionTracker(TowerHook):
    """A runner's own vision hook, last in its pass: writes the positions of the state before and
    after every block (after the other hooks' cuts and insertions) to ``target.positions``, so a
    block whose projections depend on positions (rotary: Eva, Qwen's towers) rotates the tokens a
    scoring hook projects. It changes nothing."""

    towers = (Tower.VISION,)

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target

    def _record(self, state: TokenState) -> TokenState:
        self.target.positions = state.positions
        return state

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        return self._record(state)

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        return self._record(state)

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        return self._record(state)
