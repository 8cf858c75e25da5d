"""Hugging Face LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres") driven by our own loop.

Per image of size (H, W) the processor picks the best grid resolution among
``config.image_grid_pinpoints`` (transformers' ``select_best_resolution``) and cuts the resized
image into ``r x c`` crops of the vision tower's size, plus one base view of the whole image:
``1 + r*c`` crops. Every crop is one batch row of the vision tower, so a pruner (a vision
:class:`~vlm.hooks.TowerHook`) acts per crop with a per-crop budget (``num_tokens`` patches of each
crop). The kept tokens are projected, then packed as ``pack_image_features`` does:

* base view: its kept patches in raster order (no newline);
* sub-crops: the ``r x c`` crop grids of ``s x s`` patches are tiled into one ``(r s) x (c s)``
  grid (row-major over crops), unpadded to the image's aspect ratio (``unpad_bounds``), and every
  grid row is followed by ``image_newline``;
* after pruning only kept patches remain, and a row's newline remains iff the row keeps a patch
  (so the LLM never sees empty rows; without pruning every row keeps all its patches). Newlines are
  layout (``VisualTokens.layout``): an LLM-stage cut keeps them like text, outside its budget;
* an LLM-stage pruner that declares ``anyres_newlines = False`` (a released recipe does) gets the
  images packed without any newline: base view, then the unpadded grid's kept patches.

The vision hooks see every crop as one batch row, and ``ctx.image_index`` (``vlm.context``) says
which image each row belongs to (so a pruner can treat an image's views together, e.g. with one
prune count per image).

The LLM inputs, forward pass and greedy generation are :class:`~vlm.towers.llava.LlavaRunner`'s.
Parity contract: with no hooks, logits and greedy tokens equal transformers' (tests, fp32).
Under the ``original`` position policy a kept token's position is its index in the image's
unpruned packed sequence (with or without newlines, as packed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from vlm.hooks import TowerHook
from vlm.llm_stage import split_stages
from vlm.towers.llava import LlavaRunner, VisualTokens


@dataclass(kw_only=True)
class AnyresTokens(VisualTokens):
    """:class:`VisualTokens` of packed anyres images (``full_count [I]``), plus the per-crop
    selection: ``crops`` (kept patches of every crop, rows in image order, base view first) and
    ``crops_per_image [I]``."""

    crops: VisualTokens
    crops_per_image: Tensor


def unpad_bounds(rows: int, cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the part of a ``rows x cols`` feature grid that covers an
    ``height x width`` image letterboxed into it (transformers' ``unpad_image``): if the image is
    wider than the grid, new_rows = int(round(height * cols / width, 7)) and (rows - new_rows) // 2
    rows go from each side; otherwise the same for columns."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - pad


class LlavaNextRunner(LlavaRunner):
    """LLaVA-NeXT: anyres crops through the block runner, packing, then LLaVA's LLM path."""

    def __init__(self, model: nn.Module, position_policy: str = "compact", packed_prefill: bool = False) -> None:
        super().__init__(model, position_policy, packed_prefill)
        cfg = model.config
        inner = getattr(model, "model", model)
        if not self.drop_cls:
            raise TypeError("anyres packing needs the 'default' feature strategy (patches only, as LLaVA-NeXT uses).")
        self.image_newline: Tensor = inner.image_newline
        self.pinpoints: list[list[int]] = [list(p) for p in cfg.image_grid_pinpoints]
        self.crop_size = int(cfg.vision_config.image_size)
        self.side = self.crop_size // int(cfg.vision_config.patch_size)

    def crop_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(r, c)`` sub-crops of an ``height x width`` image (best pinpoint / crop size)."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), self.pinpoints)
        if best_h % self.crop_size or best_w % self.crop_size:
            raise ValueError(f"grid pinpoint {(best_h, best_w)} is not a multiple of the crop size {self.crop_size}.")
        return best_h // self.crop_size, best_w // self.crop_size

    def encode_images(
        self, pixel_values: Tensor, hooks: Optional[Iterable[TowerHook]] = None, image_sizes: Optional[Tensor] = None
    ) -> AnyresTokens:
        """``pixel_values [I, P, 3, S, S]`` (crops padded to P, as the processor returns them) or
        ``[sum of crops, 3, S, S]``; ``image_sizes [I, 2]`` original (height, width)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them).")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        grids = [self.crop_grid(h, w) for h, w in sizes]
        n_crops = [r * c + 1 for r, c in grids]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"{pixel_values.shape[0]} images in pixel_values but {len(sizes)} image_sizes.")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_crops)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(n_crops):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not hold the {sum(n_crops)} crops of image_sizes.")
        split = split_stages(hooks)
        newlines = split.llm is None or split.llm.anyres_newlines
        image_index = torch.repeat_interleave(torch.arange(len(n_crops)), torch.tensor(n_crops)).to(pixel_values.device)
        crops = self.project_kept(pixel_values, split.hooks, image_index)
        dense, kept = self._dense(crops)
        feats, poss, lays, full = [], [], [], []
        for i, start in enumerate(torch.tensor([0] + n_crops).cumsum(0)[:-1].tolist()):
            crop_rows = slice(start, start + n_crops[i])
            f, p, lay, n = self.pack(dense[crop_rows], kept[crop_rows], grids[i], sizes[i], newlines)
            feats.append(f)
            poss.append(p)
            lays.append(lay)
            full.append(n)
        device = crops.features.device
        return AnyresTokens(
            features=pad_sequence(feats, batch_first=True),
            counts=torch.tensor([f.shape[0] for f in feats], device=device),
            positions=pad_sequence(poss, batch_first=True, padding_value=-1),
            full_count=torch.tensor(full, device=device),
            layout=pad_sequence(lays, batch_first=True) if newlines else None,
            crops=crops,
            crops_per_image=torch.tensor(n_crops, device=device),
        )

    def _dense(self, crops: VisualTokens) -> tuple[Tensor, Tensor]:
        """Kept projected patches scattered back onto each crop's grid: ``features [C, s*s, D]``
        (zeros where pruned) and ``kept [C, s*s]``."""
        c, k, d = crops.features.shape
        hw = self.side * self.side
        valid = torch.arange(k, device=crops.features.device)[None] < crops.counts[:, None]
        index = torch.where(valid, crops.positions, hw)  # pruned slots go to a dropped column
        dense = crops.features.new_zeros(c, hw + 1, d).scatter(1, index[..., None].expand(-1, -1, d), crops.features)
        kept = torch.zeros(c, hw + 1, dtype=torch.bool, device=valid.device).scatter(1, index, valid)
        return dense[:, :hw], kept[:, :hw]

    def pack(
        self, dense: Tensor, kept: Tensor, grid: tuple[int, int], size: tuple[int, int], newlines: bool = True
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """One image: base view then the unpadded sub-crop grid, with row newlines if ``newlines``
        (module docstring). Returns the kept features ``[n, D]``, their indices in the unpruned packed
        sequence ``[n]``, which of them are newlines ``[n]`` (bool), and that sequence's length."""
        r, c = grid
        s, d = self.side, dense.shape[-1]
        grid_f = dense[1:].view(r, c, s, s, d).permute(0, 2, 1, 3, 4).reshape(r * s, c * s, d)
        grid_k = kept[1:].view(r, c, s, s).permute(0, 2, 1, 3).reshape(r * s, c * s)
        top, bottom, left, right = unpad_bounds(r * s, c * s, *size)
        grid_f, grid_k = grid_f[top:bottom, left:right], grid_k[top:bottom, left:right]
        grid_nl = torch.zeros_like(grid_k)
        if newlines:
            newline = self.image_newline.to(grid_f).expand(grid_f.shape[0], 1, d)
            grid_f = torch.cat([grid_f, newline], 1)
            grid_nl = torch.cat([grid_nl, torch.ones_like(grid_k[:, :1])], 1)
            grid_k = torch.cat([grid_k, grid_k.any(1, keepdim=True)], 1)
        grid_f, grid_k, grid_nl = grid_f.reshape(-1, d), grid_k.reshape(-1), grid_nl.reshape(-1)
        hw = s * s
        base_pos = kept[0].nonzero().flatten()
        grid_pos = grid_k.nonzero().flatten()
        features = torch.cat([dense[0, base_pos], grid_f[grid_pos]])
        layout = torch.cat([torch.zeros_like(base_pos, dtype=torch.bool), grid_nl[grid_pos]])
        return features, torch.cat([base_pos, hw + grid_pos]), layout, hw + grid_k.numel()
