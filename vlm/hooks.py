"""The hook protocol that prompt learners (``vlm.prompts``) and pruners (``vlm.pruning``) implement.

A tower runner calls, for every block ``layer`` of tower ``tower`` ("vision", "text" or "llm"):
``before_block`` -> ``attention_spec`` -> the block (attention via ``vlm.kernels.attention``) ->
``after_block``. Every method is optional: the defaults leave the state and spec unchanged.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from vlm.kernels.spec import AttnOutput, AttnSpec
from vlm.tokens import TokenState


class TowerHook(nn.Module):
    """Base class of everything that plugs into a tower's block loop."""

    #: Towers this hook acts on; the runner skips it for others.
    towers: tuple[str, ...] = ("vision", "text", "llm")

    def before_block(self, tower: str, layer: int, state: TokenState) -> TokenState:
        return state

    def attention_spec(self, tower: str, layer: int, state: TokenState, spec: AttnSpec) -> AttnSpec:
        return spec

    def after_block(self, tower: str, layer: int, state: TokenState, attn: AttnOutput) -> TokenState:
        return state

    def on_tower_start(self, tower: str, state: TokenState) -> TokenState:
        """Called once after embedding, before block 0 (e.g. to reset per-pass scratch)."""
        return state

    def on_tower_end(self, tower: str, state: TokenState) -> TokenState:
        """Called once after the last block, before the tower's final norm and pooling."""
        return state


def active_hooks(hooks: Iterable[TowerHook] | None, tower: str) -> Sequence[TowerHook]:
    """The hooks that act on ``tower``, in order."""
    return [h for h in (hooks or ()) if tower in h.towers]


class HookList:
    """Runs a list of hooks for one tower, in order, threading state and spec through them."""

    def __init__(self, hooks: Iterable[TowerHook] | None, tower: str) -> None:
        self.tower = tower
        self.hooks = list(active_hooks(hooks, tower))

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def start(self, state: TokenState) -> TokenState:
        for h in self.hooks:
            state = h.on_tower_start(self.tower, state)
        return state

    def before(self, layer: int, state: TokenState) -> TokenState:
        for h in self.hooks:
            state = h.before_block(self.tower, layer, state)
        return state

    def spec(self, layer: int, state: TokenState, spec: AttnSpec) -> AttnSpec:
        for h in self.hooks:
            spec = h.attention_spec(self.tower, layer, state, spec)
        return spec

    def after(self, layer: int, state: TokenState, attn: AttnOutput) -> TokenState:
        for h in self.hooks:
            state = h.after_block(self.tower, layer, state, attn)
        return state

    def end(self, state: TokenState) -> TokenState:
        for h in self.hooks:
            state = h.on_tower_end(self.tower, state)
        return state

