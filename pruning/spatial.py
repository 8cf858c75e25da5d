"""Spatial downsampling of the patch grid: the simplest token-reduction baseline, which the
UniPruneBench visual-token-compression benchmark found strong. There is no official code to
follow; the rule is adaptive average pooling as PyTorch defines it. Registered as ``spatial_pool``
(the bare word is ordinary vocabulary of shared code, which may not name a method).

After block ``layer`` the ``h x w`` patch grid of each image (or crop) is reduced to an
``h' x w'`` grid with ``h' w' = num_tokens`` exactly:

* **Output grid.** Among the factorisations ``h' x w' = num_tokens`` with ``h' <= h`` and
  ``w' <= w``, the one whose aspect ratio is closest to the grid's (``|log(h'/w') - log(h/w)|``
  smallest; ties: fewer rows). 24x24 -> 8x8 for 64, 8x16 for 128, 12x16 for 192. A budget no such
  grid fits (e.g. a prime above the grid side) is an error; a budget >= ``h w`` keeps every patch.
* **Cells** are those of adaptive pooling (``torch.nn.functional.adaptive_avg_pool2d``): output row
  ``i`` covers input rows ``floor(i h / h') .. ceil((i + 1) h / h') - 1``, columns likewise (cells
  overlap when ``h'`` does not divide ``h``).
* ``mode="pool"``: each cell's token is the mean of its patches' hidden states;
  ``mode="stride"``: the cell's top-left patch, unchanged (nearest-neighbour subsampling).
* The token of a cell sits at the position of the cell's **top-left patch** (``TokenState.positions``),
  so the kept tokens stay in raster order and LLaVA's positions/projector see one token per cell.

CLS, registers, prompts and other non-patch tokens are kept unchanged. The grid is read from the
patches' original positions (consecutive, raster order): square by default, or ``grid=(h, w)``.

The Qwen towers (``ctx.token_group > 1``: dynamic-resolution images, 2x2 merge units) are not
supported: a hook sees neither an image's ``image_grid_thw`` nor a unit's grid row and column, so
the grid of merge units cannot be rebuilt from the block context; a clear ``TypeError`` says so.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from vlm.context import BlockContext, resolve_layer
from vlm.kernels import AttnOutput
from vlm.pruning.base import TokenPruner
from vlm.pruning.registry import register
from vlm.tokens import TokenState, TokenType

MODES = ("pool", "stride")


def output_grid(count: int, h: int, w: int) -> tuple[int, int]:
    """``(h', w')`` with ``h' w' = count``, ``h' <= h``, ``w' <= w``, aspect closest to ``h / w``."""
    fits = [(a, count // a) for a in range(1, count + 1) if count % a == 0 and a <= h and count // a <= w]
    if not fits:
        raise ValueError(
            f"spatial pruning: no grid of exactly num_tokens={count} cells fits the {h}x{w} patch grid "
            f"(need h' x w' = {count} with h' <= {h}, w' <= {w}); choose a budget with such a factorisation."
        )
    target = math.log(h / w)
    return min(fits, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - target), 9), hw[0]))


def cell_starts(size: int, out: int) -> list[int]:
    """First input index of each adaptive-pooling cell."""
    return [(i * size) // out for i in range(out)]


@register("spatial_pool")
class SpatialPruner(TokenPruner):
    """Adaptive average pooling (or strided subsampling) of the patch grid to ``num_tokens`` cells.

    Args:
        num_tokens: cells kept per image or crop (exactly: ``h' w' = num_tokens``).
        layer: the block after which the grid is pooled (default: the last block of the pass).
        mode: ``"pool"`` (mean of each cell) or ``"stride"`` (each cell's top-left patch).
        grid: ``(h, w)`` of the patch grid; None: square, from the patch count.
    """

    runs_on_merge_units = False  # needs the patch grid, which a merge-unit tower's hooks do not see

    def __init__(self, num_tokens: int = 64, layer: int = -1, mode: str = "pool",
                 grid: Optional[tuple[int, int]] = None) -> None:
        super().__init__(num_tokens)
        if mode not in MODES:
            raise ValueError(f"spatial pruning: mode must be one of {MODES}, got {mode!r}.")
        self.layer = layer
        self.mode = mode
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise ValueError(f"spatial pruning: grid={self.grid} has {self.grid[0] * self.grid[1]} cells but the image has {n} patches.")
            return self.grid
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"spatial pruning: {n} patches are not a square grid; pass grid=(h, w).")
        return side, side

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        if ctx.token_group > 1:
            raise TypeError(
                f"spatial pruning needs each image's patch grid, but this tower merges {ctx.token_group} patches per "
                "token over per-image dynamic grids (Qwen2.5-VL / Qwen3-VL) that the block context does not carry. "
                "Use a score-based pruner on these towers, or give TowerContext the per-image unit grid."
            )
        b, _, dim = state.x.shape
        dev = state.x.device
        patch = state.type_mask(TokenType.PATCH)
        counts = patch.sum(1)
        pos = state.positions
        first = pos.masked_fill(~patch, torch.iinfo(pos.dtype).max).min(1).values
        cell = (pos - first[:, None]).masked_fill(~patch, 0)  # grid index of each patch
        n, uneven, span = torch.stack([counts[0], (counts != counts[0]).any().long(), cell.max()]).tolist()  # sync: shapes
        if uneven or span != n - 1:
            raise ValueError("spatial pruning needs every patch of each image at the cut (consecutive original positions); "
                             "another hook cut patches before it.")
        h, w = self._grid(n)
        if self.num_tokens >= n:
            return state
        oh, ow = output_grid(self.num_tokens, h, w)
        rs, cs = cell_starts(h, oh), cell_starts(w, ow)
        owner = torch.full((h * w,), -1, dtype=torch.long, device=dev)  # grid index -> the cell it is the top-left of
        owner[torch.tensor([r * w + c for r in rs for c in cs], device=dev)] = torch.arange(oh * ow, device=dev)
        new, _ = self.keep_top(state, ((owner[cell] >= 0) & patch).float(), oh * ow)
        if self.mode == "stride":
            return new
        # pool: the cells' means (adaptive_avg_pool2d) replace the kept top-left patches
        rows = torch.arange(b, device=dev)[:, None].expand_as(cell)
        dense = torch.zeros(b, h * w, dim, dtype=state.x.dtype, device=dev)
        dense[rows[patch], cell[patch]] = state.x[patch]
        pooled = F.adaptive_avg_pool2d(dense.view(b, h, w, dim).permute(0, 3, 1, 2), (oh, ow)).flatten(2).transpose(1, 2)
        kept = new.type_mask(TokenType.PATCH)
        at = owner[(new.positions - first[:, None]).clamp(min=0, max=h * w - 1)].clamp(min=0)
        values = torch.gather(pooled, 1, at[..., None].expand(-1, -1, dim))
        return new.replace(x=torch.where(kept[..., None], values, new.x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}, mode={self.mode!r}, grid={self.grid}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``, ``num_tokens`` patches for every image."""
        return [resolve_layer(self.layer, num_blocks)], False
