"""DiSa's regularisers and saliency masking (Alipour Talemi, Kashiani, Nowdeh, Afghah, "DiSa:
Directional Saliency-Aware Prompt Learning for Generalizable Vision-Language Models", KDD 2025,
arXiv 2505.19373). No official code exists; what the paper text fixes and what is a documented
choice is spelled out on each function.

Notation: ``f_p``/``g_p`` prompted image/text features, ``f_o``/``g_o`` frozen (prompt-off) ones,
all L2-normalised; ``s`` CLIP's logit scale (100 for OpenAI CLIP).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.prompts.dapt_masks import patch_grid
from vlm.tokens import TokenType

#: PromptSRC's self-regularisation weights (muzairkhattak/PromptSRC ``trainers/promptsrc.py``):
#: text L1 x 25, image L1 x 10, logit KL x 1.
SR_TEXT_WEIGHT, SR_IMAGE_WEIGHT, SR_LOGIT_WEIGHT = 25.0, 10.0, 1.0
KL_DIRECTIONS = ("prompted_image_first", "frozen_image_first")


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``mean_b KL(softmax(p) || softmax(q))`` over the batch (sum over classes)."""
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def cross_interactive(
    f_p: Tensor, g_o: Tensor, f_o: Tensor, g_p: Tensor, scale: Tensor, direction: str = "prompted_image_first"
) -> Tensor:
    """L_CIR (paper: ``D_KL(q_{f_p g_o}, q_{f_o g_p})``, in the paper's [3P] structure):
    ``KL(softmax(s f_p g_o^T) || softmax(s f_o g_p^T))``: the prompted image encoder meets the frozen
    text encoder, and the frozen image encoder meets the prompted text encoder. Gradient flows into
    both sides (vision prompts through ``f_p``, text prompts through ``g_p``). ``direction``
    ``"frozen_image_first"`` swaps the KL arguments (the paper's argument order is ambiguous)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}; got {direction!r}.")
    a, b = scale * f_p @ g_o.t(), scale * f_o @ g_p.t()
    return kl(a, b) if direction == "prompted_image_first" else kl(b, a)


def self_regularisation(
    f_p: Tensor, f_o: Tensor, g_p: Tensor, g_ens: Tensor, logits_p: Tensor, scale: Tensor
) -> dict[str, Tensor]:
    """L_SR as PromptSRC defines it (unweighted terms):
    ``text = mean|g_p - g_ens|`` (L1, ``g_ens`` the frozen template-ensemble text features),
    ``image = mean|f_p - f_o|``, ``logits = sum KL(softmax(s f_o g_ens^T) || softmax(logits_p)) / (B C)``
    (PromptSRC divides the summed KL by the number of logits, not by the batch)."""
    zero_shot = scale * f_o @ g_ens.t()
    log_p, log_o = F.log_softmax(logits_p, -1), F.log_softmax(zero_shot, -1)
    logit_kl = (log_o.exp() * (log_o - log_p)).sum() / logits_p.numel()
    return {"text": F.l1_loss(g_p, g_ens), "image": F.l1_loss(f_p, f_o), "logits": logit_kl}


def directional(f_p: Tensor, prototypes: Tensor, labels: Tensor) -> Tensor:
    """L_DiR: ``mean_b (1 - cos(f_p(x_b), mu_{y_b}))``, alignment in direction, not distance (paper
    abstract: "consistency in feature orientation over strict proximity"; formula [INF])."""
    return (1 - F.cosine_similarity(f_p, prototypes[labels], dim=-1)).mean()


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``mu_c = normalize(mean_{i: y_i = c} f_o(x_i))`` ``[C, E]`` (paper: "class-mean statistics")."""
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or bool((counts[:num_classes] == 0).any()):
        raise ValueError(f"Class prototypes need at least one training image of each of the {num_classes} classes.")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return F.normalize(sums / counts[:, None].to(features.dtype), dim=-1)


def projected_patches(dense: Callable[[Tensor], Tensor], tokens: Tensor, types: Tensor) -> Tensor:
    """Patch tokens of the last block through the vision runner's ``dense_features`` (its final norm
    and projection), ``[B, P, E]``: the dense, MaskCLIP-style features comparable with text features."""
    is_patch = types == int(TokenType.PATCH)
    counts = is_patch.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("Saliency needs the same number of patch tokens in every image.")
    return dense(tokens[is_patch].view(tokens.shape[0], int(counts[0]), tokens.shape[-1]))


def text_saliency(patch_features: Tensor, class_text: Tensor) -> Tensor:
    """``a_i = cos(patch_i, g_o(y))`` ``[B, P]``: relevance of each patch to the frozen text feature
    of the image's ground-truth class (the frozen *text* encoder ranks the patches, paper abstract;
    the exact formula is [INF])."""
    return F.cosine_similarity(patch_features, class_text[:, None, :], dim=-1)


def keep_salient(scores: Tensor, mask_ratio: float) -> Tensor:
    """Bool ``[B, P]``: all but the ``floor(mask_ratio * P)`` least salient patches of each image."""
    p = scores.shape[1]
    drop = int(mask_ratio * p)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop > 0:
        keep.scatter_(1, scores.topk(drop, dim=1, largest=False).indices, False)
    return keep


def mask_patches(images: Tensor, keep: Tensor) -> Tensor:
    """Zero the pixels of dropped patches (after normalisation, i.e. the dataset mean colour); the
    sequence length is unchanged, so no attention change is needed."""
    rows, cols = patch_grid(images, keep.shape[1])
    grid = keep.view(-1, 1, rows, cols).to(images.dtype)
    return images * F.interpolate(grid, size=images.shape[-2:], mode="nearest")
