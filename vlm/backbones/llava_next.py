"""LLaVA-NeXT (LLaVA-1.6, anyres) through Hugging Face transformers, driven by
:class:`~vlm.towers.llava_next.LlavaNextRunner`.

Same arguments as :class:`~vlm.backbones.llava.LlavaBackbone`: ``model`` is a hub id (e.g.
``llava-hf/llava-v1.6-vicuna-7b-hf``) or a local directory of a ``LlavaNextForConditionalGeneration``;
``config`` a ``LlavaNextConfig`` dict for a random model. Pruners act per crop (base view and each
sub-crop keep ``num_tokens`` patches), so a 5-crop image keeps at most 5 x ``num_tokens`` patches
before unpadding, plus one newline per non-empty grid row. The budget check
(``Backbone.check_budget``) therefore compares a vision budget with the patches of one crop, and
an LLM-stage budget with the most crops per image times what each crop keeps.
"""

from __future__ import annotations

from vlm.backbones.llava import LlavaBackbone
from vlm.towers.llava_next import LlavaNextRunner


class LlavaNextBackbone(LlavaBackbone):
    """LLaVA-NeXT: ``LlavaNextForConditionalGeneration`` + :class:`LlavaNextRunner`."""

    family = "llava_next"
    model_class, config_class = "LlavaNextForConditionalGeneration", "LlavaNextConfig"
    runner_class = LlavaNextRunner
    #: every crop (the base view and each sub-crop) is one vision-tower image, pruned to ``num_tokens``
    patch_unit = "crop"

    @property
    def views_per_image(self) -> int:
        """The base view plus the largest crop grid among ``image_grid_pinpoints`` (5 for
        LLaVA-NeXT-7B: 336 px crops in grids of 1x2, 2x1, 2x2, 3x1 or 1x3, the largest 2x2)."""
        crop = int(self.model.config.vision_config.image_size)
        return 1 + max((int(h) // crop) * (int(w) // crop) for h, w in self.model.config.image_grid_pinpoints)

    @property
    def budget_note(self) -> str:
        return f"{super().budget_note}, per crop; up to {self.views_per_image} crops per image with the base view"
