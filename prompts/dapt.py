"""DAPT: Decouple-before-Align Prompt Tuning (Zhang, Zhou, Yao, Zhang, Tsang, Wang, TPAMI 2025,
arXiv 2508.00395), on the MaPLe base of its released code (Ferenas/DAPT @ e556f17).

Each training image is decoupled into a foreground view ``x * M`` and a background view
``x * (1 - M)``; the full view is aligned with the class text (MaPLe's CE), pulled toward the
foreground and pushed from the background feature (triplet), the foreground view is aligned with
the class text and the background view with hand-written background classes ("a clean origami
{ground, sky, ...}."). The losses, words and schedule are in ``dapt_losses.py``; masks come from
the batch (``vlm.datamodules.masked``, DAPT-S) or, as a marked variant, from the frozen CLIP's CLS
attention (``dapt_masks.py``).

Prompts are MaPLe's (``maple.py``; DAPT's defaults b = 2, J = 9, "a photo of a"). The background
rows use raw token embeddings at layer 0, and MaPLe's deep text prompts still replace their
positions 1..b in layers 1..J-1, as in the official text pass over ``n_cls + 32`` rows.

Documented choices (``prompt-learners.md`` §3.7):

* ``bg_slicing="correct"`` (default): ``L_cls``/``L_f`` score the real classes only and ``L_b``
  scores all 32 background rows. ``"official"`` reproduces the code's slicing by 25: the 7 rows
  ground..sky join the class columns of ``L_cls``/``L_f`` in training, and ``L_b`` uses the last
  25 rows.
* ``eval_extra_bg_columns`` (default 0): background rows appended as extra columns at evaluation,
  so a background prediction counts as an error. The official base evaluation (``forward``) uses
  7, the official novel evaluation (``forward_test``) 32; run base and new with the matching value
  for parity (the official base-to-novel protocol evaluates them in separate runs too).
* The foreground pass always runs under ``no_grad`` (``z_f`` is only ever used detached), and the
  background pass only in the triplet phase; this is numerically identical to the code (pitfall 5).
* No dead second ViT (``visual_ori``) and no GradCAM pass whose result is discarded (pitfalls 1-2).
* The auxiliary losses act in training only; validation logs the classification loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from vlm.prompts.base import Encoder, TextInputs
from vlm.prompts.dapt_losses import (
    BACKGROUND_TEMPLATE,
    BACKGROUND_WORDS,
    OFFICIAL_BG_SLICE,
    TRIPLET_MARGIN,
    DaptSchedule,
    background_pseudo_ce,
    foreground_ce,
    triplet_pull_push,
)
from vlm.prompts.dapt_masks import NORMALIZE_MODES, cls_attention_masks, decouple
from vlm.prompts.maple import MaPLe
from vlm.prompts.registry import register

BG_SLICING = ("correct", "official")
MASK_SOURCES = ("dataset", "cls_attention")


@register("dapt")
class DAPT(MaPLe):
    """MaPLe prompts trained with DAPT's decoupled views.

    Args:
        prompts: MaPLe's arguments (``n_ctx``, ``depth``, ``ctx_init``, ``init_std``,
            ``coupling_init``, ``ctx_init_rule``); the official DAPT config is MaPLe's defaults (2, 9,
            "a photo of a", couplings cloned from one Linear).
        mask_source: ``"dataset"`` (DAPT-S: ``batch["mask"]``, an error if absent) or
            ``"cls_attention"`` (variant: masks from the frozen CLIP's last-block CLS attention).
        mask_threshold: CLS-attention threshold after dividing by the maximum (DAPT-G's 0.5).
        mask_normalize: ``"image"`` (per-image maximum) or ``"batch"`` (official GradCAM's global max).
        switch_epoch: first epoch index of the fg/bg phase (official: 7, i.e. ``epoch > 6``).
        triplet_weight, fg_weight, bg_weight: official ``para_vd=0.8``, ``para_fg=0.1``, ``para_bg=0.5``.
        triplet_margin: official 1.5.
        background_words: the background classes (official 25 scene + 7 food words).
        background_template: official "a clean origami {}.".
        bg_slicing: ``"correct"`` or ``"official"`` (see the module docstring).
        eval_extra_bg_columns: background columns appended at evaluation (parity: 7 base, 32 novel).
    """

    def __init__(
        self,
        mask_source: str = "dataset",
        mask_threshold: float = 0.5,
        mask_normalize: str = "image",
        switch_epoch: int = 7,
        triplet_weight: float = 0.8,
        fg_weight: float = 0.1,
        bg_weight: float = 0.5,
        triplet_margin: float = TRIPLET_MARGIN,
        background_words: Optional[list[str]] = None,
        background_template: str = BACKGROUND_TEMPLATE,
        bg_slicing: str = "correct",
        eval_extra_bg_columns: int = 0,
        **prompts: Any,
    ) -> None:
        super().__init__(**prompts)
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}; got {mask_source!r}.")
        if mask_normalize not in NORMALIZE_MODES:
            raise ValueError(f"mask_normalize must be one of {NORMALIZE_MODES}; got {mask_normalize!r}.")
        if bg_slicing not in BG_SLICING:
            raise ValueError(f"bg_slicing must be one of {BG_SLICING}; got {bg_slicing!r}.")
        self.background_words = list(background_words) if background_words is not None else list(BACKGROUND_WORDS)
        if bg_slicing == "official" and len(self.background_words) <= OFFICIAL_BG_SLICE:
            raise ValueError(f"bg_slicing='official' slices by {OFFICIAL_BG_SLICE}; it needs more background words.")
        if not 0 <= eval_extra_bg_columns <= len(self.background_words):
            raise ValueError(f"eval_extra_bg_columns must be in 0..{len(self.background_words)}; got {eval_extra_bg_columns}.")
        self.mask_source, self.mask_threshold, self.mask_normalize = mask_source, mask_threshold, mask_normalize
        self.schedule = DaptSchedule(switch_epoch, triplet_weight, fg_weight, bg_weight)
        self.triplet_margin = triplet_margin
        self.background_template = background_template
        self.bg_slicing = bg_slicing
        self.eval_extra_bg_columns = eval_extra_bg_columns
        self.epoch = 0
        self._bg_cache: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}

    # --- background text ------------------------------------------------------------------------
    @property
    def train_extra_bg_columns(self) -> int:
        """Background rows among the class columns in training (official slicing: 32 - 25 = 7)."""
        if self.bg_slicing != "official":
            return 0
        return len(self.background_words) - OFFICIAL_BG_SLICE

    def loss_background_words(self) -> list[str]:
        """The rows of ``T_bg`` in ``L_b``: all words, or the official last 25."""
        return self.background_words[-OFFICIAL_BG_SLICE:] if self.bg_slicing == "official" else self.background_words

    def background_inputs(self, words: list[str]) -> TextInputs:
        """Tokens and raw (frozen) token embeddings of ``background_template`` over ``words``."""
        key = tuple(words)
        device = self.ctx.device
        if key not in self._bg_cache or self._bg_cache[key][0].device != device:
            tokens = self.codec.tokenize([self.background_template.format(w) for w in words]).to(device)
            self._bg_cache[key] = (tokens, self.codec.embed(tokens))
        tokens, embeds = self._bg_cache[key]
        return TextInputs(tokens=tokens, embeds=embeds)

    def background_features(self, words: list[str], encoder: Encoder) -> Tensor:
        """L2-normalised prompted text features of the background rows (deep prompts apply)."""
        inputs = self.background_inputs(words)
        return encoder.encode_text(inputs.tokens, [self], inputs.embeds, normalize=True)

    def text_inputs(self, classnames: list[str], template: str = "{}") -> TextInputs:
        """MaPLe's class rows, followed by the extra background columns of the parity options."""
        inputs = super().text_inputs(classnames, template)
        extra = self.train_extra_bg_columns if self.training else self.eval_extra_bg_columns
        if extra == 0:
            return inputs
        bg = self.background_inputs(self.background_words[:extra])
        return TextInputs(
            tokens=torch.cat([inputs.tokens, bg.tokens]), embeds=torch.cat([inputs.embeds, bg.embeds.to(inputs.embeds.dtype)])
        )

    # --- masks and losses -----------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def masks(self, batch: dict[str, Tensor], encoder: Encoder) -> Tensor:
        """Foreground masks ``[B, 1, H, W]`` for the batch (dataset masks or the CLS-attention variant)."""
        images = batch["image"]
        if self.mask_source == "cls_attention":
            return cls_attention_masks(encoder, images, self.mask_threshold, self.mask_normalize)
        if "mask" not in batch:
            raise KeyError(
                "DAPT(mask_source='dataset') needs batch['mask'] (use vlm.datamodules.masked.MaskedFewShotDataModule), "
                "or set mask_source='cls_attention' for masks from the frozen CLIP's CLS attention (a variant)."
            )
        return batch["mask"]

    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], encoder: Encoder) -> dict[str, Tensor]:
        """The scheduled DAPT terms, already weighted (``L_cls`` is the classifier's own CE)."""
        if not self.training:
            return {}
        w = self.schedule.weights(self.epoch)
        fg_view, bg_view = decouple(batch["image"], self.masks(batch, encoder))
        hooks = [self]
        scale = encoder.logit_scale.exp()
        terms: dict[str, Tensor] = {}
        if w["triplet"] > 0:
            with torch.no_grad():
                z_f = encoder.encode_image(fg_view, hooks, normalize=True)
                z_b = encoder.encode_image(bg_view, hooks, normalize=True)
            terms["dapt_triplet"] = w["triplet"] * triplet_pull_push(outputs["image_features"], z_f, z_b, self.triplet_margin)
        if w["fg"] > 0:
            with torch.no_grad():
                z_f = encoder.encode_image(fg_view, hooks, normalize=True)
            terms["dapt_fg"] = w["fg"] * foreground_ce(z_f, outputs["text_features"], batch["label"], scale)
        if w["bg"] > 0:
            z_b = encoder.encode_image(bg_view, hooks, normalize=True)
            t_bg = self.background_features(self.loss_background_words(), encoder)
            terms["dapt_bg"] = w["bg"] * background_pseudo_ce(z_b, t_bg, scale)
        return terms

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mask_source={self.mask_source!r}, bg_slicing={self.bg_slicing!r}, "
            f"eval_extra_bg_columns={self.eval_extra_bg_columns}, schedule={self.schedule}"
        )
