"""DiSa: Directional Saliency-Aware Prompt Learning (Alipour Talemi, Kashiani, Nowdeh, Afghah,
KDD 2025, arXiv 2505.19373), on the IVLP base (independent deep vision and text prompts).

Objective (paper, [3P] form): ``L = L_CE + L_SR + L_CIR + lambda L_DiR``.

* ``L_CE``: the classifier's CE on ``s f_p g_p^T`` (computed by ``CLIPClassifier``).
* ``L_SR``: PromptSRC's self-regularisation against the frozen model: L1 text (x25) to the
  template-ensemble frozen text features, L1 image (x10) to the frozen image features, KL (x1)
  of the zero-shot logits to the prompted logits (``disa_losses.self_regularisation``).
* ``L_CIR``: cross-interactive KL between ``s f_p(x~) g_o^T`` (prompted image on the saliency-masked
  view vs frozen text) and ``s f_o(x) g_p^T`` (frozen image vs prompted text).
* Saliency masking: the frozen pass's projected patch tokens are ranked by cosine to the frozen
  text feature of the true class; the ``mask_ratio`` least salient patches are set to the mean
  colour (zero after normalisation) in the view the prompted image encoder sees inside CIR.
  Training only: the saliency uses the label.
* ``L_DiR``: ``1 - cos(f_p, mu_y)``, with ``mu_c`` the normalised class means of frozen image
  features over the *training shots* (un-augmented), computed once before fit from the frozen
  features the module serves (``fit_requests``: :class:`~vlm.prompts.base.TrainShotFeatures`).

The frozen pass is the same backbone without hooks under ``no_grad`` (``needs_frozen_pass``):
``CLIPClassifier.frozen_outputs`` provides ``f_o``, ``g_o``, the zero-shot logits and the vision
tokens for the saliency in one pass.

Constants and where they come from (no official code):
  * prompts: PromptSRC's IVLP recipe, 4 + 4 tokens, depth 9, "a photo of a" [INF: DiSa's own not retrieved];
  * L_SR weights 25 / 10 / 1: PromptSRC's code; ensemble target: the mean of the frozen text
    features over ``sr_templates`` (PromptSRC uses a 60-template copy of CLIP's ImageNet list;
    the default here is CLIP's full 80-template list, which open_clip ships);
  * ``cir_weight`` 1, ``dir_weight`` (lambda) 1, ``mask_ratio`` 0.25: not retrieved, starting
    values of the research note; each is a flag. PromptSRC's Gaussian prompt aggregation is not
    part of DiSa's stated objective and is not implemented.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.prompts.base import Encoder, ShotFeatures, TrainShotFeatures
from vlm.prompts.dapt_masks import ClsAttentionProbe
from vlm.prompts.disa_losses import (
    KL_DIRECTIONS,
    SR_IMAGE_WEIGHT,
    SR_LOGIT_WEIGHT,
    SR_TEXT_WEIGHT,
    class_prototypes,
    cross_interactive,
    directional,
    keep_salient,
    mask_patches,
    projected_patches,
    self_regularisation,
    text_saliency,
)
from vlm.prompts.ivlp import IVLP
from vlm.prompts.registry import register
from vlm.tokens import TokenType

SALIENCY_SOURCES = ("text", "cls_attention")
PROTOTYPE_SOURCES = ("test_transform", "train_loader")


@register("disa")
class DiSa(IVLP):
    """IVLP prompts with DiSa's regularisers.

    Args:
        prompts: IVLP's prompt arguments (``n_ctx_text``, ``n_ctx_vision``, ``depth_text``,
            ``depth_vision``, ``ctx_init``, ``init_std``); PromptSRC's 4 + 4, depth 9 recipe is in
            ``configs/experiments/disa/recipe.yaml``.
        mask_ratio: fraction of patches masked in the CIR view (0: no masking, no extra pass).
        saliency_source: ``"text"`` (cosine of projected patches to ``g_o(y)``) or
            ``"cls_attention"`` (frozen last-block CLS attention; one more frozen pass).
        cir_weight: weight of L_CIR. cir_direction: KL argument order (``KL_DIRECTIONS``).
        sr_text_weight, sr_image_weight, sr_logit_weight: L_SR weights (PromptSRC: 25, 10, 1).
        sr_templates: templates of the frozen text ensemble (None: CLIP's 80 ImageNet templates).
        dir_weight: lambda of L_DiR.
        prototype_source: ``"test_transform"`` (training shots with the test transform) or
            ``"train_loader"`` (one pass over the augmented training loader).
    """

    needs_frozen_pass = True

    def __init__(
        self,
        mask_ratio: float = 0.25,
        saliency_source: str = "text",
        cir_weight: float = 1.0,
        cir_direction: str = "prompted_image_first",
        sr_text_weight: float = SR_TEXT_WEIGHT,
        sr_image_weight: float = SR_IMAGE_WEIGHT,
        sr_logit_weight: float = SR_LOGIT_WEIGHT,
        sr_templates: Optional[list[str]] = None,
        dir_weight: float = 1.0,
        prototype_source: str = "test_transform",
        **prompts: Any,
    ) -> None:
        super().__init__(**prompts)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}.")
        for value, allowed, name in (
            (saliency_source, SALIENCY_SOURCES, "saliency_source"),
            (cir_direction, KL_DIRECTIONS, "cir_direction"),
            (prototype_source, PROTOTYPE_SOURCES, "prototype_source"),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
        self.mask_ratio, self.saliency_source = mask_ratio, saliency_source
        self.cir_weight, self.cir_direction = cir_weight, cir_direction
        self.sr_weights = {"text": sr_text_weight, "image": sr_image_weight, "logits": sr_logit_weight}
        self.sr_templates = list(sr_templates) if sr_templates else None
        self.dir_weight, self.prototype_source = dir_weight, prototype_source
        self.register_buffer("prototypes", None, persistent=False)
        self._ensemble_cache: dict[tuple[str, ...], Tensor] = {}

    # --- frozen-model quantities ----------------------------------------------------------------
    def templates(self) -> list[str]:
        if self.sr_templates is not None:
            return self.sr_templates
        from vlm.datamodules.templates import IMAGENET_TEMPLATES

        return IMAGENET_TEMPLATES

    @torch.no_grad()
    def ensemble_text_features(self, classnames: list[str], encoder: Encoder) -> Tensor:
        """PromptSRC's frozen text target: normalise(mean over templates of raw frozen features)."""
        key = tuple(classnames)
        if key not in self._ensemble_cache:
            feats = []
            for t in self.templates():
                tokens = encoder.tokenize([t.format(c.replace("_", " ")) for c in classnames])
                feats.append(encoder.encode_text(tokens.to(self.ctx.device), []))
            self._ensemble_cache[key] = F.normalize(torch.stack(feats).mean(0), dim=-1)
        return self._ensemble_cache[key]

    def build(self, backbone: Any) -> None:
        """IVLP's prompts; the text saliency also needs the vision runner's ``dense_features`` (per-patch
        features in the joint space), which attention-pooled towers (SigLIP) do not have."""
        super().build(backbone)
        if self.saliency_source == "text" and getattr(backbone.vision, "dense_features", None) is None:
            raise ValueError(
                f"DiSa saliency_source='text' compares patch features with text features, which needs a vision "
                f"tower with per-patch features in the joint space ({type(backbone.vision).__name__} has no "
                "dense_features: an attention-pooled tower such as SigLIP's). Use a CLS-token CLIP backbone, or "
                "saliency_source='cls_attention' on a tower with a CLS token."
            )

    def fit_requests(self) -> tuple[TrainShotFeatures, ...]:
        """The frozen features of the training shots (for the prototypes of L_DiR and the class
        list of L_SR): un-augmented by default, or the augmented training loader."""
        return (TrainShotFeatures("test" if self.prototype_source == "test_transform" else "train"),)

    def receive(self, request: TrainShotFeatures, answer: ShotFeatures) -> None:
        """Class prototypes ``mu_c`` from the training shots' features; the training class list."""
        self.classnames = list(answer.classnames)
        self.prototypes = class_prototypes(answer.features, answer.labels, len(answer.classnames))

    def saliency_keep(self, outputs: dict[str, Tensor], images: Tensor, labels: Tensor, encoder: Encoder) -> Tensor:
        """Bool ``[B, P]`` patches kept in the CIR view."""
        if self.saliency_source == "text":
            with torch.no_grad():
                patches = projected_patches(encoder.vision.dense_features, outputs["frozen_vision_tokens"],
                                            outputs["frozen_vision_types"])
                scores = text_saliency(patches, outputs["frozen_text_features"][labels])
        else:
            weights, types = ClsAttentionProbe().run(encoder, images)
            scores = weights.mean(1)[types == int(TokenType.PATCH)].view(images.shape[0], -1)
        return keep_salient(scores, self.mask_ratio)

    # --- losses ---------------------------------------------------------------------------------
    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], encoder: Encoder) -> dict[str, Tensor]:
        """L_SR (3 weighted terms), L_CIR and lambda L_DiR; training only (the saliency uses labels)."""
        if not self.training:
            return {}
        if "frozen_image_features" not in outputs:
            raise KeyError("DiSa needs the frozen pass outputs (CLIPClassifier adds them when needs_frozen_pass).")
        images, labels = batch["image"], batch["label"]
        f_p, g_p = outputs["image_features"], outputs["text_features"]
        f_o, g_o = outputs["frozen_image_features"], outputs["frozen_text_features"]
        scale = encoder.logit_scale.exp()
        terms: dict[str, Tensor] = {}
        if any(self.sr_weights.values()):
            g_ens = self.ensemble_text_features(self._classnames(outputs), encoder)
            sr = self_regularisation(f_p, f_o, g_p, g_ens, outputs["logits"], scale)
            terms.update({f"disa_sr_{k}": self.sr_weights[k] * v for k, v in sr.items() if self.sr_weights[k]})
        if self.cir_weight:
            f_view = f_p
            if self.mask_ratio > 0:
                masked = mask_patches(images, self.saliency_keep(outputs, images, labels, encoder))
                f_view = encoder.encode_image(masked, [self], normalize=True)
            terms["disa_cir"] = self.cir_weight * cross_interactive(f_view, g_o, f_o, g_p, scale, self.cir_direction)
        if self.dir_weight:
            if self.prototypes is None:
                raise RuntimeError("DiSa: class prototypes are missing; they are built before fit from the training shots (fit_requests), or set .prototypes.")
            terms["disa_dir"] = self.dir_weight * directional(f_p, self.prototypes, labels)
        return terms

    def _classnames(self, outputs: dict[str, Tensor]) -> list[str]:
        names = getattr(self, "classnames", None)
        if names is None or len(names) != outputs["text_features"].shape[0]:
            raise RuntimeError("DiSa: set .classnames (done before fit, with the prototypes) to the training classes for L_SR.")
        return names

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mask_ratio={self.mask_ratio}, saliency={self.saliency_source!r}, "
            f"cir_weight={self.cir_weight}, sr_weights={self.sr_weights}, dir_weight={self.dir_weight}"
        )
