"""The language model's seam: a hook that, after one decoder layer, chooses the visual tokens to keep.

The language model of a LLaVA-style model keeps its own attention (SDPA, flash), so it has no
block hooks. An :class:`LlmStage` is shown an :class:`LlmProbe` (that layer's post-RoPE keys and
values of the visual tokens and one probe query per sample) and says which visual tokens to keep;
it may bring a vision-tower hook with it (``vision_stage``). :func:`split_stages` splits a hook
list once into the vision/text hooks and the LLM stage, which is how the runners consume it. The
runner (``vlm.towers.language_model.CutDecoder``) owns positions, masks and the KV-cache split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from vlm.context import Tower
from vlm.hooks import TowerHook


@dataclass
class LlmProbe:
    """One decoder layer's attention inputs, per sample, for the probe row and the visual tokens.

    ``query [B, H, d]``: post-RoPE query of the probe token; ``query_value [B, Hkv, d]`` its value;
    ``keys, values [B, Hkv, N, d]``: post-RoPE keys and values of the sample's scored visual tokens
    (layout tokens such as kept ``image_newline`` are not among them) in sequence order, padded to
    the batch maximum N; ``counts [B]`` visual tokens per sample (slots at or after the count are
    padding). ``H = Hkv * G`` with grouped-query attention: query head ``h`` reads key/value head
    ``h // G``, as the model's attention does.
    """

    query: Tensor
    query_value: Tensor
    keys: Tensor
    values: Tensor
    counts: Tensor

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool: the slots that hold a visual token."""
        n = self.keys.shape[2]
        return torch.arange(n, device=self.counts.device)[None] < self.counts[:, None]


class LlmStage(TowerHook):
    """A hook on the language model: one cut of the visual tokens after decoder layer ``layer``.

    Implementations set ``layer`` (the decoder layer, 0-based, whose attention inputs are scored
    and after which the cut happens) and ``vision_stage`` (a vision-tower hook run before this
    stage, e.g. a first vision-side cut, or None) and implement :meth:`keep`. The runner owns
    positions, masks and the KV-cache split; a stage only chooses.
    """

    towers = (Tower.LLM,)
    #: whether LLaVA-NeXT's packing keeps its ``image_newline`` tokens when this stage runs; kept
    #: newlines are layout: never scored, never cut, outside the budget.
    anyres_newlines: bool = True

    def keep(self, probe: LlmProbe) -> Tensor:
        """``[B, N]`` bool: the visual slots of ``probe`` to keep (padding slots are ignored)."""
        raise TypeError(f"{type(self).__name__} is an LlmStage but does not implement keep(probe).")


@dataclass(frozen=True)
class StageHooks:
    """A hook list split once: the vision/text ``hooks`` (an LLM stage's ``vision_stage`` in its
    place) and the one ``llm`` stage, or None."""

    hooks: tuple[TowerHook, ...]
    llm: Optional[LlmStage]


def split_stages(hooks: Union[Iterable[TowerHook], StageHooks, None]) -> StageHooks:
    """Split ``hooks`` into :class:`StageHooks` (idempotent: a split list is returned as it is).
    At most one LLM stage per pass."""
    if isinstance(hooks, StageHooks):
        return hooks
    tower: list[TowerHook] = []
    stages: list[LlmStage] = []
    for h in hooks or ():
        if isinstance(h, LlmStage):
            stages.append(h)
            vision = getattr(h, "vision_stage", None)
            if vision is not None:
                tower.append(vision)
        else:
            tower.append(h)
    if len(stages) > 1:
        raise ValueError(f"At most one LLM-stage pruner (hook) per pass, got {[type(h).__name__ for h in stages]}.")
    return StageHooks(tuple(tower), stages[0] if stages else None)
