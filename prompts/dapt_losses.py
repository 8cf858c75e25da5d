"""DAPT's background classes, losses and epoch schedule (Zhang et al., "Decouple before Align:
Visual Disentanglement Enhances Prompt Tuning", TPAMI 2025; official code Ferenas/DAPT @ e556f17,
``trainers/maple.py``).

With ``z_I, z_f, z_b`` the L2-normalised features of the full, foreground and background views,
``T_fg`` the class text features, ``T_bg`` the background-class text features and ``tau`` CLIP's
logit scale:

* ``L_cls = CE(tau z_I T_fg^T, y)`` (computed by the classifier module);
* ``L_v = TripletMargin(anchor=z_I, pos=sg(z_f), neg=sg(z_b))``, Euclidean, margin 1.5: the
  visual pull-push; only the anchor receives gradient;
* ``L_f = CE(tau sg(z_f) T_fg^T, y)``: trains the text side only;
* ``L_b = CE(tau z_b T_bg^T, argmax(z_b T_bg^T))``: the background view is aligned with its own
  most similar background class (a self pseudo-label).

Schedule (hard switch on the 0-indexed epoch, coefficients ``para_vd``, ``para_fg``, ``para_bg``
hard-coded in the official code): epochs 0..6 train ``L_cls + 0.8 L_v``; epochs >= 7 train
``L_cls + 0.1 L_f + 0.5 L_b``. The paper's figure draws one joint objective; the code
time-multiplexes it, and this module follows the code. (In the 5-epoch base-to-novel recipe the
switch never happens: base-to-novel trains ``L_cls + 0.8 L_v`` only.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: The 25 scene words of the official background bank (``BACKGROUND_CATEGORY``).
SCENE_WORDS: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
    "street", "valley", "bridge", "sign",
)  # fmt: skip
#: The 7 food words the official code always appends after the scene words.
FOOD_WORDS: tuple[str, ...] = ("table", "forks", "tablecloth", "hands", "spoon", "glasses", "dishes")
#: All 32 background classes, in the official order.
BACKGROUND_WORDS: tuple[str, ...] = SCENE_WORDS + FOOD_WORDS
#: The background prompt of the official code.
BACKGROUND_TEMPLATE = "a clean origami {}."
#: The official code slices text rows by ``len(BACKGROUND_CATEGORY)`` = 25 while appending 32 rows,
#: so 32 - 25 = 7 background rows land among the class columns (pitfall 3 of §3.7).
OFFICIAL_BG_SLICE = len(SCENE_WORDS)
OFFICIAL_EXTRA_COLUMNS = len(BACKGROUND_WORDS) - OFFICIAL_BG_SLICE

#: Triplet margin of the official ``nn.TripletMarginLoss(margin=1.5)``.
TRIPLET_MARGIN = 1.5


@dataclass(frozen=True)
class DaptSchedule:
    """Loss weights per epoch. Defaults: the official ``para_vd=0.8``, ``para_fg=0.1``,
    ``para_bg=0.5`` and the switch ``epoch > 6`` (i.e. from epoch index 7)."""

    switch_epoch: int = 7
    triplet_weight: float = 0.8
    fg_weight: float = 0.1
    bg_weight: float = 0.5

    def weights(self, epoch: int) -> dict[str, float]:
        """``{"triplet", "fg", "bg"}`` weights at the 0-indexed ``epoch``."""
        if epoch < self.switch_epoch:
            return {"triplet": self.triplet_weight, "fg": 0.0, "bg": 0.0}
        return {"triplet": 0.0, "fg": self.fg_weight, "bg": self.bg_weight}


def triplet_pull_push(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = TRIPLET_MARGIN) -> Tensor:
    """``L_v``: ``mean(max(||a - sg(p)|| - ||a - sg(n)|| + margin, 0))`` (torch's triplet loss, p = 2)."""
    return F.triplet_margin_loss(anchor, positive.detach(), negative.detach(), margin=margin, p=2.0)


def foreground_ce(fg_features: Tensor, text_features: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """``L_f = CE(tau sg(z_f) T_fg^T, y)``."""
    return F.cross_entropy(scale * fg_features.detach() @ text_features.t(), labels)


def background_pseudo_ce(bg_features: Tensor, bg_text_features: Tensor, scale: Tensor) -> Tensor:
    """``L_b = CE(tau z_b T_bg^T, argmax_j(z_b T_bg^T))`` (the pseudo-label carries no gradient)."""
    logits = scale * bg_features @ bg_text_features.t()
    with torch.no_grad():
        target = logits.argmax(-1)
    return F.cross_entropy(logits, target)
