"""Foreground masks without segmentation files: the frozen CLIP's last-block CLS attention.

DAPT (Zhang et al., TPAMI 2025) obtains masks from SEEM segmentations (DAPT-S) or from GradCAM
(DAPT-G). This module is a **variant** of neither: when a batch has no ``"mask"``, the mask is
the frozen CLIP's attention from the CLS token to the patches in the *last* vision block,
averaged over heads, read with ``AttnSpec.probe_rows`` through a hook (no eager attention, no
patching). Following the DAPT-G post-processing of the official ``trainers/util.py`` GradCAM
(``prompt-learners.md`` §3.3), the map is divided by its maximum and thresholded at 0.5; the
maximum is taken per image by default (``normalize="image"``) or over the batch as the official
GradCAM does (``normalize="batch"``). The patch grid is upsampled to pixels with nearest
interpolation, so each patch is wholly foreground or background.

:func:`decouple` builds the two DAPT views from a normalised image and a mask:
``x_f = x * M`` and ``x_b = x * (1 - M)``. As in the official code the product is taken *after*
normalisation, so masked pixels become the dataset mean colour, not black (§3.7, pitfall 4).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.context import BlockContext, Tower, TowerContext
from vlm.hooks import TowerHook, cls_query_row
from vlm.kernels.spec import AttnOutput, AttnSpec
from vlm.tokens import TokenState, TokenType

NORMALIZE_MODES = ("image", "batch")


class ClsAttentionProbe(TowerHook):
    """Records the CLS row of the attention weights of one vision block (default: the last).

    After a pass, ``weights`` is ``[B, H, N]`` (fp32, over the tokens that remain after the block)
    and ``types`` the ``[B, N]`` token types of those tokens. The CLS row is appended to the spec's
    ``probe_rows`` (:meth:`~vlm.hooks.TowerHook.request_probe`), so a pruner that probes the same
    block still gets its own rows. ``weights``/``types`` are handed out after the pass, so they are
    attributes reset in ``on_tower_start`` (the rule in ``vlm.hooks``).
    """

    towers = (Tower.VISION,)

    def __init__(self, layer: int = -1) -> None:
        super().__init__()
        self.layer = layer
        self.weights: Optional[Tensor] = None
        self.types: Optional[Tensor] = None

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        self.weights, self.types = None, None
        return state

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return spec
        return self.request_probe(ctx, state, spec, cls_query_row(state, "ClsAttentionProbe"))

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer == ctx.resolve_layer(self.layer) and attn.probes is not None:
            self.weights = self.key_columns(ctx, self.read_probe(ctx, attn)[:, :, 0])
            self.types = state.batch_types
        return state

    def run(self, encoder: Any, images: Tensor) -> tuple[Tensor, Tensor]:
        """Run the frozen vision tower of ``encoder`` on ``images`` (no other hooks, no grad);
        return the CLS attention ``[B, H, N]`` and the key types ``[B, N]``."""
        with torch.no_grad():
            encoder.encode_image(images, [self])
        if self.weights is None or self.types is None:
            raise RuntimeError("ClsAttentionProbe: the probed block returned no attention probes.")
        return self.weights, self.types


def patch_grid(images: Tensor, num_patches: int) -> tuple[int, int]:
    """The (rows, cols) patch grid of ``images [B, 3, H, W]`` with ``num_patches`` patches."""
    h, w = images.shape[-2:]
    side = int(round((num_patches * h / w) ** 0.5))
    if side < 1 or num_patches % side:
        raise ValueError(f"Cannot lay {num_patches} patches on a {h}x{w} image grid.")
    return side, num_patches // side


def cls_attention_masks(
    encoder: Any, images: Tensor, threshold: float = 0.5, normalize: str = "image", layer: int = -1
) -> Tensor:
    """Binary foreground masks ``[B, 1, H, W]`` from the frozen CLIP's CLS->patch attention.

    ``a = mean_heads(CLS row)[patches]``; ``a / max(a)`` (per image or per batch) ``>= threshold``.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}; got {normalize!r}.")
    weights, types = ClsAttentionProbe(layer).run(encoder, images)
    is_patch = types == int(TokenType.PATCH)
    counts = is_patch.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("cls_attention_masks needs the same number of patch tokens in every image.")
    scores = weights.mean(1)[is_patch].view(images.shape[0], -1)  # key order = patch order
    peak = scores.amax(1, keepdim=True) if normalize == "image" else scores.amax().expand(scores.shape[0], 1)
    keep = (scores / peak.clamp_min(torch.finfo(scores.dtype).tiny)) >= threshold
    rows, cols = patch_grid(images, scores.shape[1])
    grid = keep.view(-1, 1, rows, cols).to(images.dtype)
    return F.interpolate(grid, size=images.shape[-2:], mode="nearest")


def decouple(images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """DAPT's views: foreground ``x * M`` and background ``x * (1 - M)`` (after normalisation)."""
    masks = masks.to(images.dtype)
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    return images * masks, images * (1 - masks)
