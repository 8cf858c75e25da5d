"""IVLP: Independent Vision-Language Prompting (the deep V+L baseline of MaPLe, Khattak, Rasheed,
Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023, Sec. 4 / Table 1; also the base
of PromptSRC and DiSa).

Text and vision towers each get their own learned prompts; nothing couples them:

* text: context ``ctx`` ``[b, D_t]`` replaces the tokens after SOS at layer 0 (MaPLe Eq. 4), and
  ``text_deep[i-1]`` ``[b, D_t]`` replaces the same slots before text block ``i`` for
  ``i = 1..depth_text-1`` (Eq. 5 with independent, not projected, prompts);
* vision: ``vision_ctx`` ``[v, D_v]`` is appended after the patch tokens before ``ln_pre``, and
  ``vision_deep[i-1]`` replaces the last ``v`` tokens before vision block ``i`` for
  ``i = 1..depth_vision-1`` (Eq. 6-7 with independent prompts).

Placement, initialisation and the ``ctx_init`` rule are in ``prompts/_deep.py``. All random prompts
are N(0, 0.02) as in the MaPLe repository's IVLP blocks (``VPT_shallow`` parameters).

Defaults are the MaPLe repository's IVLP config ``vit_b16_c2_ep5_batch4_2+2ctx.yaml``: 2 text + 2
vision tokens, "a photo of a", depth 12 in both towers (ViT-B/16 has 12 blocks; deeper towers
are not needed, but a depth beyond the tower is an error at ``build``). PromptSRC's IVLP variant
(4+4 tokens, depth 9, lr 0.0025, 20 epochs) is the same class with other arguments.

Public API (stable; DiSa subclasses this class):
  * class ``IVLP``; registry name ``"ivlp"``;
  * parameters ``ctx``, ``text_deep`` (``[depth_text-1, b, D_t]`` or None), ``vision_ctx``
    (``[v, D_v]`` or None), ``vision_deep`` (``[depth_vision-1, v, D_v]`` or None);
  * ``text_prompts(layer)`` / ``vision_prompts(layer)``: the vectors entering block ``layer``
    (``None`` where nothing is inserted); override them to transform prompts;
  * a prompt-free frozen pass: call the backbone without this hook.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from torch import Tensor, nn

from vlm.prompts._deep import DeepVLPrompts, backbone_ref, normal_
from vlm.prompts.registry import register
from vlm.prompts.released import DasslLayout, Rule


def _released_settings(state: dict) -> dict:
    """Context sizes and depths of a released checkpoint (depth = 1 + its per-block prompts)."""
    if "prompt_learner.ctx" not in state:
        return {}
    text = [k for k in state if re.fullmatch(r"text_encoder\.transformer\.resblocks\.\d+\.VPT_shallow", k)]
    vision = [k for k in state if re.fullmatch(r"image_encoder\.transformer\.resblocks\.\d+\.VPT_shallow", k)]
    n_v = int(state["image_encoder.VPT"].shape[0]) if "image_encoder.VPT" in state else 0
    return {"n_ctx_text": int(state["prompt_learner.ctx"].shape[0]), "depth_text": 1 + len(text),
            "n_ctx_vision": n_v, "depth_vision": (1 + len(vision)) if n_v else 0}


@register("ivlp")
class IVLP(DeepVLPrompts):
    """Independent deep vision and language prompts on a CLIP backbone.

    Args:
        n_ctx_text: text context tokens b (``N_CTX_TEXT``).
        n_ctx_vision: vision prompt tokens v (``N_CTX_VISION``; 0 = language-only prompting).
        depth_text: text prompt depth (``PROMPT_DEPTH_TEXT``, >= 1).
        depth_vision: vision prompt depth (``PROMPT_DEPTH_VISION``; 0 with ``n_ctx_vision=0``).
        ctx_init: phrase initialising the text context (used when b <= its token count).
        init_std: std of the random N(0, std) prompt init.
        ctx_init_rule: ``"words"`` or the released code's ``"released"`` (``DeepVLPrompts``).
    """

    #: muzairkhattak/multimodal-prompt-learning ``trainers/independentVL.py`` (PromptSRC's prompts
    #: are the same, beside its frozen zero-shot image encoder): Dassl registers the whole CustomCLIP.
    #: The prompt entering block i >= 1 is that block's ``VPT_shallow`` (our row i - 1).
    released_layout = DasslLayout(
        model_name="VLPromptLearner",
        rules=(
            Rule("prompt_learner.ctx", "prompt_learner.ctx"),
            Rule("image_encoder.VPT", "prompt_learner.vision_ctx"),
            Rule("text_encoder.transformer.resblocks.{row}.VPT_shallow", "prompt_learner.text_deep", row_offset=1),
            Rule("image_encoder.transformer.resblocks.{row}.VPT_shallow", "prompt_learner.vision_deep", row_offset=1),
        ),
        settings=_released_settings,
        frozen=("image_encoder.", "text_encoder.", "logit_scale", "prompt_learner.ZS_image_encoder."),
        also=("PromptSRC",),
    )

    def __init__(
        self,
        n_ctx_text: int = 2,
        n_ctx_vision: int = 2,
        depth_text: int = 12,
        depth_vision: int = 12,
        ctx_init: Optional[str] = "a photo of a",
        init_std: float = 0.02,
        ctx_init_rule: str = "words",
    ) -> None:
        super().__init__(n_ctx_text, n_ctx_vision, depth_text, depth_vision, ctx_init, init_std, ctx_init_rule)
        for name in ("ctx", "text_deep", "vision_ctx", "vision_deep"):
            self.register_parameter(name, None)

    def build(self, backbone: Any) -> None:
        """Create the prompts sized to the towers' widths (text: word-embedding / block width)."""
        super().build(backbone)
        self.check_backbone(backbone)
        ref = backbone_ref(backbone)
        self.ctx = nn.Parameter(self.build_text_context(backbone))
        dt, dv = int(backbone.text.width), int(backbone.vision.width)
        std = self.init_std
        self.text_deep = nn.Parameter(normal_((self.depth_text - 1, self.n_ctx_text, dt), ref, std)) if self.depth_text > 1 else None
        if self.n_ctx_vision > 0:
            self.vision_ctx = nn.Parameter(normal_((self.n_ctx_vision, dv), ref, std))
            if self.depth_vision > 1:
                self.vision_deep = nn.Parameter(normal_((self.depth_vision - 1, self.n_ctx_vision, dv), ref, std))

    def text_prompts(self, layer: int) -> Optional[Tensor]:
        if layer == 0:
            return self.ctx
        if layer < self.depth_text and self.text_deep is not None:
            return self.text_deep[layer - 1]
        return None

    def vision_prompts(self, layer: int) -> Optional[Tensor]:
        if layer == 0:
            return self.vision_ctx
        if layer < self.depth_vision and self.vision_deep is not None:
            return self.vision_deep[layer - 1]
        return None
