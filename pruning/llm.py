"""The LLM-stage pruner interface: cut the visual tokens inside the language model, after one
decoder layer (or several: ``LlmStage.cuts`` / ``keep_stage``), with scores conditioned on the text.

A vision pruner (:class:`~vlm.pruning.base.TokenPruner`) acts in the vision tower through the
block-loop hooks. An :class:`LlmTokenPruner` acts in the LLM prefill, which the runner drives layer
by layer (``vlm.towers.language_model.CutDecoder``, used by the LLaVA runners and ``QwenRunner``
whenever such a pruner is among the hooks). At decoder layer ``layer`` the runner takes the layer's
own post-RoPE keys and values (from its KV cache) of the sample's visual tokens and of one probe row
per sample (the last prompt token), re-projects the probe row's query from the layer's input with
the layer's input norm, ``q_proj``, ``q_norm`` where the attention has one (Qwen3) and RoPE (Qwen's
3-D M-RoPE at the probe token's own position), and passes them as an :class:`LlmProbe` to
:meth:`LlmTokenPruner.keep`. After the layer,
each sample keeps all its text tokens (and any layout tokens among the visual ones, e.g. kept
``image_newline`` tokens: see ``anyres_newlines``) and the kept visual tokens, in their original order; layers
``layer + 1`` onwards run on the shorter sequence. Positions, masks and the KV-cache split belong to
the runner, so a pruner here is only a score.

A pruner with several cuts overrides ``cuts()`` (the layers, strictly increasing; ``layer`` is the
first) and ``keep_stage(probe, stage)``: cut ``i`` sees the survivors of cut ``i - 1`` (its probe's
``counts``; ``initial_counts`` the counts before the first cut) at its own layer, and keeps a subset.
``score_next = True`` scores a cut after layer ``k`` with layer ``k + 1``'s projections of layer
``k``'s output instead of layer ``k``'s own attention inputs (``vlm.llm_stage.LlmStage``).
``merge_stage(probe, stage, keep)`` (default None) may return weights over the visual slots for new
tokens (averages of the layer's output states) that the runner inserts after the visual block.

An LLM-stage pruner may bring a vision stage (``vision_stage``, a vision :class:`TokenPruner`) that
the runner adds to the vision tower's hooks: one config object then describes a two-stage method
(e.g. a released anyres recipe). It is a :class:`~vlm.pruning.base.Pruner` (``towers = (Tower.LLM,)``), so it goes wherever
a pruner goes (registry, configs, ``LlavaEval(pruner=...)``); the vision block loop skips it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from torch import Tensor

from vlm.context import Tower
from vlm.llm_stage import LlmProbe, LlmStage
from vlm.pruning.base import Pruner, TokenPruner, top_count


class LlmTokenPruner(Pruner, LlmStage, ABC):
    """Base class of LLM-stage pruners. Subclasses implement :meth:`score`.

    Args:
        num_tokens: visual tokens each sample keeps after the cut (all of them when it has fewer,
            as the vision pruners do).
        layer: the decoder layer (0-based) whose attention inputs are scored and after which the
            cut happens; it must leave at least one layer after it (checked against the model).
        vision_stage: a vision pruner run in the vision tower before this stage, or None.
    """

    towers = (Tower.LLM,)

    def __init__(self, num_tokens: int = 64, layer: int = 1, vision_stage: Optional[TokenPruner] = None) -> None:
        super().__init__(num_tokens)
        if layer < 0:
            raise ValueError(f"{type(self).__name__}: layer must be >= 0 (a decoder layer index), got {layer}.")
        if isinstance(vision_stage, LlmTokenPruner):
            raise TypeError(f"{type(self).__name__}: vision_stage must be a vision pruner, got an LLM-stage one.")
        self.layer = int(layer)
        self.vision_stage = vision_stage

    @abstractmethod
    def score(self, probe: LlmProbe) -> Tensor:
        """``[B, N]`` scores of the visual slots (higher is kept first; padding slots are ignored)."""

    def keep(self, probe: LlmProbe) -> Tensor:
        """``[B, N]`` bool: the ``min(num_tokens, count)`` best-scored visual tokens of each sample;
        ties keep the earlier token."""
        return self.keep_best(probe, probe.counts.clamp(max=self.num_tokens))

    def keep_best(self, probe: LlmProbe, count: Tensor) -> Tensor:
        """``[B, N]`` bool: each sample's ``count`` best-scored visual tokens by :meth:`score` (padding
        slots never); ties keep the earlier token. The cut of every score-ranking stage."""
        valid = probe.valid
        scores = self.score(probe).float().masked_fill(~valid, float("-inf"))
        return valid & top_count(scores, count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}"
