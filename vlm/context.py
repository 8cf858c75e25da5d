"""What a hook may use during a tower pass: typed values, never a back-reference to the model.

A tower runner opens one :class:`TowerContext` per pass (``vlm.towers.runner.TowerPass``) and
hands every hook, for each block, a :class:`BlockContext`: the tower (:class:`Tower`), the layer
index and the number of blocks this pass runs, the block's adapter (its own norm and q/k/v
projections, for hooks that score with them), and the image each batch row belongs to (views of
one image, e.g. LLaVA-NeXT's anyres crops).

Per-pass state is one small typed object per hook: a hook declares ``PassState`` (a dataclass
with defaults) and reads its instance with ``ctx.state(self)``. The object is created on first
use in each pass, so it starts fresh every pass and never leaks into the next one or another
tower. Probe bookkeeping (which ``probe_rows`` a hook appended in this block) lives here too.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Optional, Protocol

from torch import Tensor

from vlm.tokens import TokenType


class Tower(str, Enum):
    """Which tower a pass runs. A ``str`` enum so configs and logs may spell it as text."""

    VISION = "vision"
    TEXT = "text"
    LLM = "llm"


def resolve_layer(layer: int, count: int, what: str = "a pass") -> int:
    """``layer`` as an index into ``count`` items, negative ones counted from the end; an
    out-of-range index is an error naming ``what`` was indexed. The one layer rule of ``vlm``."""
    idx = layer if layer >= 0 else count + layer
    if not 0 <= idx < count:
        raise ValueError(f"layer {layer} is out of range for {what} of {count} blocks.")
    return idx


class BlockProjections(Protocol):
    """What a hook may use of the block it runs in (``vlm.towers.blocks.BlockAdapter``)."""

    heads: int

    def attn_input(self, x: Tensor) -> Tensor:
        """The pre-attention norm of the residual ``x`` (identity for a post-norm block)."""
        ...

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head ``q, k, v [B, H, N, d]`` of the normalised input, with the block's projections."""
        ...

    def values(self, x: Tensor) -> Tensor:
        """Per-head ``v [B, H, N, d]`` of the normalised input: position-independent, so it takes
        tokens that are not in the pass's state (e.g. a mean token)."""
        ...


@dataclasses.dataclass(frozen=True)
class ProbeSlot:
    """Where a hook's rows landed in ``spec.probe_rows`` for one block: ``start``, ``count``, and the
    key/value-only mask of that block's keys (``None``: every key stays after the block);
    ``mean``: the hook asked for the mean-query row (``AttnSpec.probe_mean_query``) instead."""

    start: int
    count: int
    kv_only: Optional[Tensor]
    mean: bool = False


class _PassStore:
    """Per-pass, per-hook objects: typed states and probe slots (keyed by the hook's identity), and
    whether the pass's tokens include a CLS token (read once, on first use)."""

    __slots__ = ("states", "probes", "has_cls")

    def __init__(self) -> None:
        self.states: dict[int, Any] = {}
        self.probes: dict[int, ProbeSlot] = {}
        self.has_cls: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class TowerContext:
    """One tower pass: ``tower``, ``num_layers`` (blocks this pass runs), ``image_index`` (long
    ``[B]``: the image each batch row belongs to; ``None``: every row is its own image) and
    ``token_group`` (how many consecutive patch tokens become one output token, e.g. the 2x2 merge
    units of the Qwen towers; a cut keeps or drops whole groups)."""

    tower: Tower
    num_layers: int
    image_index: Optional[Tensor] = None
    _store: _PassStore = dataclasses.field(default_factory=_PassStore, repr=False, compare=False)
    token_group: int = 1

    def state(self, hook: Any) -> Any:
        """``hook``'s ``PassState`` instance for this pass (created on first use)."""
        key = id(hook)
        st = self._store.states.get(key)
        if st is None:
            cls = getattr(hook, "PassState", None)
            if cls is None:
                raise TypeError(f"{type(hook).__name__} keeps per-pass state but declares no PassState dataclass.")
            st = self._store.states[key] = cls()
        return st

    def resolve_layer(self, layer: int) -> int:
        """A layer index; negative ones count from the end of the blocks this pass runs."""
        return resolve_layer(layer, self.num_layers, f"a {self.tower.value} pass")

    def has_cls(self, types: Tensor) -> bool:
        """Whether the pass's tokens (``types``, any shape) include a CLS token; read on the first
        call of the pass only (# sync: once per pass; CLS is never cut)."""
        if self._store.has_cls is None:
            self._store.has_cls = bool((types == int(TokenType.CLS)).any())
        return self._store.has_cls

    def at(self, layer: int, block: BlockProjections) -> "BlockContext":
        """The context of block ``layer``, sharing this pass's per-hook state; the previous block's
        probe slots are cleared (a probe is read in the block that requested it)."""
        self._store.probes.clear()
        return BlockContext(self.tower, self.num_layers, self.image_index, self._store, self.token_group, layer, block)

    # --- probe bookkeeping (vlm.hooks.TowerHook.request_probe / read_probe) --------------------
    def set_probe(self, hook: Any, slot: ProbeSlot) -> None:
        self._store.probes[id(hook)] = slot

    def probe(self, hook: Any) -> ProbeSlot:
        slot = self._store.probes.get(id(hook))
        if slot is None:
            raise RuntimeError(f"{type(hook).__name__} reads a probe it did not request in this block.")
        return slot


@dataclasses.dataclass(frozen=True)
class BlockContext(TowerContext):
    """One block of a pass: ``layer`` (0-based) and ``block``, the adapter that runs it (its
    ``attn_input`` norm and ``qkv`` projections are the block's own, for scoring hooks)."""

    layer: int = 0
    block: Optional[BlockProjections] = None
