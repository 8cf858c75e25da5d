"""LLaVA-NeXT (LLaVA-1.6, anyres) through Hugging Face transformers, driven by
:class:`~vlm.towers.llava_next.LlavaNextRunner`.

Same arguments as :class:`~vlm.backbones.llava.LlavaBackbone`: ``model`` is a hub id (e.g.
``llava-hf/llava-v1.6-vicuna-7b-hf``) or a local directory of a ``LlavaNextForConditionalGeneration``;
``config`` a ``LlavaNextConfig`` dict for a random model. Pruners act per crop (base view and each
sub-crop keep ``num_tokens`` patches), so a 5-crop image keeps at most 5 x ``num_tokens`` patches
before unpadding, plus one newline per non-empty grid row.
"""

from __future__ import annotations

from vlm.backbones.llava import LlavaBackbone
from vlm.towers.llava_next import LlavaNextRunner


class LlavaNextBackbone(LlavaBackbone):
    """LLaVA-NeXT: ``LlavaNextForConditionalGeneration`` + :class:`LlavaNextRunner`."""

    family = "llava_next"
    model_class, config_class = "LlavaNextForConditionalGeneration", "LlavaNextConfig"
    runner_class = LlavaNextRunner
