"""The Qwen2.5-VL and Qwen3-VL vision towers (transformers) run block by block through
:class:`~vlm.towers.runner.TowerPass`, with every attention product in ``vlm.kernels.attention``.

What the library's tower computes (transformers 5.x), and how this runner reproduces it:

* **Patches.** The processor flattens each image into ``t x h x w`` patches of
  ``C x temporal_patch x p x p`` pixels, already in *merge-block-major* order: the ``m x m``
  patches (``m = spatial_merge_size``) that become one LLM token are consecutive. Patch ``n`` of an
  image belongs to merge unit ``u = n // m^2`` at unit coordinates
  ``(ut, uh, uw) = (u // (h'w'), (u // w') % h', u % w')`` with ``h' = h/m, w' = w/m``, and sits at
  patch row/column ``(uh m + j // m, uw m + j % m)``, ``j = n % m^2`` (:func:`patch_coords`).
  ``patch_embed`` (a Conv3d with stride = kernel) maps each to the width ``D``.
* **Qwen3-VL position embedding.** A learned ``G x G`` table (``G^2 = num_position_embeddings``)
  resampled bilinearly, corners aligned, to the image's ``h x w`` patch grid:
  ``y = r (G-1)/(h-1)``, ``x = c (G-1)/(w-1)``, ``E(r, c) = sum over the four neighbours
  (y0|y0+1, x0|x0+1) of (1-|y-y_i|)(1-|x-x_j|) T[y_i, x_j]`` (:func:`interpolated_pos_embed`).
* **2-D rotary embedding.** Per head (dim ``d``), with ``inv_freq_i = theta^{-4i/d}``
  (``i < d/4``): angles ``a = [r inv_freq, c inv_freq]`` (``d/2`` values), repeated twice;
  ``q' = q cos(a) + rotate_half(q) sin(a)``, the same for ``k`` (:func:`rotate`), in fp32.
* **Qwen2.5-VL windows.** Merge units are grouped into windows of ``s x s`` units
  (``s = window_size / m / patch_size``), windows in raster order per frame, units raster inside a
  window; the tower runs on the patches reordered that way (:func:`window_ids`). Blocks in
  ``fullatt_block_indexes`` attend within each frame of each image, the others within each window.
  Qwen3-VL has no windows: every block attends within each frame.
* **Merger.** After the last block, each unit's ``m^2`` consecutive patches are concatenated
  (``m^2 D``) and mapped by the merger (Qwen2.5: RMSNorm then MLP; Qwen3: LayerNorm then MLP) to one
  LLM token; Qwen2.5 then un-permutes the windows back to raster order.
* **DeepStack (Qwen3-VL).** After each block in ``deepstack_visual_indexes`` its own merger (the
  norm after the concatenation) maps the tokens to LLM width; the LLM adds them to its hidden
  states after its first layers (``vlm.towers.qwen``).

Layout here: one batch row per image (``image_index`` = the row), tokens in the attention order
above (window order for Qwen2.5), padded to the largest image with ``TokenState.lengths``;
``TokenState.positions`` holds each token's patch index in the processor's order. Each block packs
the valid tokens of every row into one sequence and makes **one** varlen
``vlm.kernels.attention`` call with ``AttnSpec(cu_seqlens_q, cu_seqlens_k)``: sequences are the
windows (windowed blocks) or the frames of each image (full-attention blocks), so images of different
sizes share a call and padding costs nothing. Window and frame ids come from the positions, so after
a hook cuts tokens the next blocks attend within the same windows over the remaining tokens.

Pruning contract: a hook cuts through the pass (``TokenPruner.keep_top``); one LLM token is one merge
unit, so cuts must keep or drop whole units (give a unit's ``m^2`` patches one score and keep
``m^2 k`` patches: ``keep_top``'s stable ties then keep whole units). A cut that splits a unit is
an error when the merger runs (the pruners cut whole units through ``ctx.token_group``). Probe rows
are served by the full-attention blocks (sequence = image row; ``AttnOutput.probes`` comes back as
``[B, H, P, N]``); a windowed block refuses them. The mean-query probe (``probe_mean_query``, the
pruners' stand-in for a CLS row) is computed over each whole image in every block, windowed ones
included, as the released Qwen pruning ports compute their global query.

Parity contract: with no hooks, the merged tokens equal transformers' ``get_image_features``
(tests, fp32), and Qwen3-VL's DeepStack features equal its ``deepstack_features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.kernels import AttnOutput, AttnSpec, attention
from vlm.kernels.reference import mean_query_weights
from vlm.tokens import TokenState, TokenType, check, kept_first
from vlm.towers.blocks import BlockAdapter
from vlm.towers.runner import PositionTracker, TowerPass


# --- geometry of one image ---------------------------------------------------------------------
def unit_grid(grid: tuple[int, int, int], merge: int) -> tuple[int, int, int]:
    """``(t, h', w')``: the merge-unit grid of an image of ``grid = (t, h, w)`` patches."""
    t, h, w = grid
    if h % merge or w % merge:
        raise ValueError(f"image grid {grid} is not a multiple of the spatial merge size {merge}.")
    return t, h // merge, w // merge


def unit_coords(grid: tuple[int, int, int], merge: int, device=None) -> Tensor:
    """long ``[t h' w', 3]``: ``(ut, uh, uw)`` of every merge unit, in raster (LLM token) order."""
    t, hu, wu = unit_grid(grid, merge)
    u = torch.arange(t * hu * wu, device=device)
    return torch.stack([u // (hu * wu), (u // wu) % hu, u % wu], dim=1)


def patch_coords(grid: tuple[int, int, int], merge: int, device=None) -> Tensor:
    """long ``[t h w, 3]``: ``(frame, row, column)`` of every patch in the processor's
    merge-block-major order (module docstring)."""
    m2 = merge * merge
    units = unit_coords(grid, merge, device).repeat_interleave(m2, dim=0)
    j = torch.arange(units.shape[0], device=device) % m2
    return torch.stack([units[:, 0], units[:, 1] * merge + j // merge, units[:, 2] * merge + j % merge], dim=1)


def window_ids(grid: tuple[int, int, int], merge: int, window_units: int, device=None) -> Tensor:
    """long ``[t h w]``: the attention window of every patch (processor order). Windows are
    ``window_units x window_units`` merge units, numbered frame by frame in raster order; sorting the
    units stably by this id gives Qwen2.5-VL's window order."""
    _, hu, wu = unit_grid(grid, merge)
    across = -(-wu // window_units)
    down = -(-hu // window_units)
    c = unit_coords(grid, merge, device)
    ids = c[:, 0] * (down * across) + (c[:, 1] // window_units) * across + c[:, 2] // window_units
    return ids.repeat_interleave(merge * merge)


def interpolated_pos_embed(table: Tensor, coords: Tensor, height: int, width: int) -> Tensor:
    """``[n, D]`` (fp32): the learned ``table [G*G, D]`` resampled bilinearly, corners aligned, at
    the patch ``coords [n, 2]`` (row, column) of an ``height x width`` grid (module docstring)."""
    side = round(table.shape[0] ** 0.5)

    def axis(index: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
        src = index.float() * (side - 1) / max(size - 1, 1)
        lo = src.floor()
        frac = src - lo
        lo = lo.long().clamp(0, side - 1)
        return lo, (lo + 1).clamp(max=side - 1), frac

    y0, y1, fy = axis(coords[:, 0], height)
    x0, x1, fx = axis(coords[:, 1], width)
    out = 0
    for yi, wy in ((y0, 1 - fy), (y1, fy)):
        for xi, wx in ((x0, 1 - fx), (x1, fx)):
            out = out + table[yi * side + xi].float() * (wy * wx)[:, None]  # fp32, as the library sums
    return out


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x cos + rotate_half(x) sin`` in fp32, back in ``x``'s dtype; ``cos, sin`` broadcast over
    the heads dimension of ``x [..., H, d]`` (given as ``[..., 1, d]``)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# --- the per-pass geometry the blocks read -----------------------------------------------------
@dataclass
class VisionGeometry:
    """What the blocks of one pass need besides the tokens: per image row, indexed by patch index
    (``TokenState.positions``), the rotary tables ``cos, sin [I, N0, d]``, the frame ``[I, N0]``
    (full-attention segments) and the window ``[I, N0]`` (windowed segments; None without windows);
    ``stride``: more than any frame or window id (the packed sequence key is ``row * stride + id``);
    ``packings``: the last :class:`Packing` per kind of block (windowed or not).
    ``positions [I, N]``: the tokens of the state the pass is at (kept current by
    :class:`~vlm.towers.runner.PositionTracker`), which :meth:`QwenVisionBlock.qkv` rotates by. ``deepstack``: the
    taps recorded by the blocks, ``(layer, features [T_u, D_llm], row [T_u], unit [T_u])``."""

    cos: Tensor
    sin: Tensor
    frame: Tensor
    window: Optional[Tensor]
    positions: Tensor
    stride: int
    deepstack: list[tuple[int, Tensor, Tensor, Tensor]] = field(default_factory=list)
    packings: dict[bool, Packing] = field(default_factory=dict)

    def tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin [B, N, d]`` of the tokens at ``positions [B, N]``."""
        index = positions.clamp(min=0)[..., None].expand(-1, -1, self.cos.shape[-1])
        return torch.gather(self.cos, 1, index), torch.gather(self.sin, 1, index)


@dataclass
class Packing:
    """One state's valid tokens packed for a varlen call: ``index [T]`` (flat ``b * N + n``), their
    image ``rows [T]`` and patch indices ``pos [T]``, the sequences ``cu`` (int32 ``[S+1]``), and
    the rotary tables ``cos, sin [T, 1, d]``; valid while the state's ``positions`` and ``lengths``
    are the same tensors."""

    positions: Tensor
    lengths: Optional[Tensor]
    index: Tensor
    rows: Tensor
    pos: Tensor
    cu: Tensor
    cos: Tensor
    sin: Tensor


# --- packing the padded state ------------------------------------------------------------------
def packed_index(state: TokenState) -> Tensor:
    """long ``[T]``: flat ``b * N + n`` of every valid token, rows in order."""
    return state.valid_mask().flatten().nonzero().flatten()  # sync: the packed length is a shape


def unpack(x: Tensor, index: Tensor, b: int, n: int) -> Tensor:
    """``x [T, ...]`` -> ``[B, N, ...]`` with zeros on padding."""
    out = x.new_zeros(b * n, *x.shape[1:])
    out[index] = x
    return out.view(b, n, *x.shape[1:])


def segments(keys: Tensor) -> Tensor:
    """int32 ``cu_seqlens [S+1]`` of the runs of equal ``keys [T]`` (each run one sequence)."""
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=keys.device)
    cu[1:] = counts.cumsum(0)
    return cu


#: AttnSpec fields a Qwen vision block cannot carry into its packed call (their shapes are per row).
_ROW_FIELDS = ("q_groups", "k_groups", "allow", "row_subset", "epilogue_add")


class QwenVisionBlock(BlockAdapter):
    """One Qwen2.5-VL / Qwen3-VL vision block (``norm1``, fused ``attn.qkv`` with the 2-D rotary
    embedding on q and k, ``attn.proj``, ``norm2``, ``mlp``), pre-norm:
    ``x + proj(attn(rot(q), rot(k), v))`` then ``x + mlp(norm2 x)``. ``windowed``: attention within
    windows (else within each frame of each image); ``tap``: a DeepStack merger whose output is
    recorded after the block (Qwen3-VL)."""

    def __init__(self, block: nn.Module, geometry_ref: GeometryRef, layer: int, windowed: bool,
                 tap: Optional[nn.Module] = None) -> None:
        self.block = block
        self.attn = block.attn
        self.heads = int(block.attn.num_heads)
        self.scale = float(block.attn.scaling)
        self.geometry_ref = geometry_ref
        self.layer = layer
        self.windowed = windowed
        self.tap = tap

    @property
    def geometry(self) -> VisionGeometry:
        return self.geometry_ref.get()

    def attn_input(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def qkv(self, x: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head ``q, k, v [B, H, N, d]`` of the normalised ``x [B, N, D]``, q and k rotated by
        the 2-D rotary embedding of the tokens at ``positions [B, N]`` (default: the pass's current
        state, which the runner tracks)."""
        positions = self.geometry.positions if positions is None else positions
        b, n, _ = x.shape
        if positions.shape != (b, n):
            raise ValueError(
                f"QwenVisionBlock.qkv: {tuple(x.shape)} tokens but positions {tuple(positions.shape)}; pass the "
                "state's positions when projecting tokens of a state other than the one the pass is at."
            )
        q, k, v = self.attn.qkv(x).view(b, n, 3, self.heads, -1).unbind(2)
        cos, sin = (t[:, :, None] for t in self.geometry.tables(positions))
        return rotate(q, cos, sin).transpose(1, 2), rotate(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def attn_out(self, o: Tensor) -> Tensor:
        return self.attn.proj(o)

    def packed_spec(self, spec: AttnSpec, cu: Tensor) -> AttnSpec:
        """The varlen spec of this block over the packed tokens (sequences ``cu``), from the spec the
        pass and its hooks built (``k_lengths`` is replaced by the packing)."""
        for name in _ROW_FIELDS:
            if getattr(spec, name) is not None:
                raise TypeError(f"QwenVisionBlock: AttnSpec.{name} (a per-row field) is not supported on the packed Qwen tower; use a hook that sets no {name} on Qwen models.")
        if spec.causal:
            raise TypeError("QwenVisionBlock: the Qwen vision tower's attention is bidirectional; a hook asked for causal attention.")
        return spec.replace(k_lengths=None, cu_seqlens_q=cu, cu_seqlens_k=cu,
                            scale=self.scale if spec.scale is None else spec.scale)

    def packing(self, state: TokenState) -> Packing:
        """Where the state's valid tokens go in the packed call and their sequences (windows or
        frames), computed once per state and kind of block: consecutive blocks without a cut between
        them share it (no recomputation, no host sync)."""
        geo = self.geometry
        cached = geo.packings.get(self.windowed)
        if cached is not None and cached.positions is state.positions and cached.lengths is state.lengths:
            return cached
        n = state.x.shape[1]
        index = packed_index(state)
        rows = index // n
        pos = state.positions.flatten()[index]
        keys = rows * geo.stride + (geo.window if self.windowed else geo.frame)[rows, pos]
        check(keys[1:] >= keys[:-1],
              "QwenVisionBlock: the tokens of each row must stay in the tower's order (windows/frames contiguous).")
        flat = rows * geo.cos.shape[1] + pos
        cos, sin = (t.flatten(0, 1)[flat][:, None] for t in (geo.cos, geo.sin))
        packing = Packing(state.positions, state.lengths, index, rows, pos, segments(keys), cos, sin)
        geo.packings[self.windowed] = packing
        return packing

    def __call__(self, state: TokenState, spec: AttnSpec) -> tuple[TokenState, AttnOutput]:
        if state.kv_only is not None:
            raise TypeError("QwenVisionBlock: key/value-only tokens (e.g. prompt pools) are not supported on the Qwen vision tower.")
        b, n, _ = state.x.shape
        p = self.packing(state)
        vspec = self.packed_spec(spec, p.cu)
        if vspec.probe_rows is not None and (self.windowed or p.cu.numel() - 1 != b):
            raise ValueError(
                "QwenVisionBlock: probe rows are served by the full-attention blocks of single-frame images "
                f"(block {self.layer} attends within {'windows' if self.windowed else 'frames'}); score from a "
                "full-attention block."
            )
        x = state.x.flatten(0, 1)[p.index]  # [T, D]
        q, k, v = self.attn.qkv(self.block.norm1(x)).view(x.shape[0], 3, self.heads, -1).unbind(1)
        q, k = rotate(q, p.cos, p.sin), rotate(k, p.cos, p.sin)
        mean_probe = None
        if vspec.probe_mean_query:  # the global query spans the whole image, in every block
            vspec = vspec.replace(probe_mean_query=False)
            qp, kp = (unpack(t, p.index, b, n).transpose(1, 2) for t in (q, k))  # [B, H, N, d]
            mean_probe = mean_query_weights(qp, kp, AttnSpec(k_lengths=state.lengths, scale=vspec.scale))
        res = attention(q, k, v, vspec)
        x = x + self.attn.proj(res.out.reshape(x.shape[0], -1))
        x = x + self.block.mlp(self.block.norm2(x))
        new = state.replace(x=unpack(x, p.index, b, n))
        if self.tap is not None:
            self.record_tap(new, x, p.rows, p.pos)
        return new, self.padded_output(res, p.index, b, n)._replace(mean_probe=mean_probe)

    def record_tap(self, state: TokenState, packed: Tensor, rows: Tensor, pos: Tensor) -> None:
        """DeepStack: this block's tap merger over the packed tokens (whole units), recorded with
        each unit's image row and unit index."""
        m2 = self.geometry_ref.merge_unit
        check_units(state, m2)
        feats = self.tap(packed)
        self.geometry.deepstack.append((self.layer, feats, rows[::m2], pos[::m2] // m2))

    def padded_output(self, res: AttnOutput, index: Tensor, b: int, n: int) -> AttnOutput:
        """The packed ``AttnOutput`` in the padded layout hooks read: ``out [B, H, N, d]``,
        ``lse [B, H, N]``, probes ``[B, H, P, N]`` (zeros past a row's length), values ``[B, H, N, d]``."""
        out = unpack(res.out, index, b, n).transpose(1, 2)
        lse = unpack(res.lse, index, b, n).transpose(1, 2)
        probes = None
        if res.probes is not None:
            per_seq = list(res.probes)  # varlen probes: one [H, P, N_i] per sequence (= image row here)
            probes = res.probes[0].new_zeros(b, per_seq[0].shape[0], per_seq[0].shape[1], n)
            for i, p in enumerate(per_seq):
                probes[i, :, :, : p.shape[-1]] = p
        values = None if res.values is None else unpack(res.values, index, b, n).transpose(1, 2)
        return AttnOutput(out, lse, probes, values)


class GeometryRef:
    """The runner's handle on the current pass's :class:`VisionGeometry` (the blocks are built once,
    the geometry per pass) and the merge unit ``m^2``."""

    def __init__(self, merge_unit: int) -> None:
        self.merge_unit = merge_unit
        self.current: Optional[VisionGeometry] = None

    def get(self) -> VisionGeometry:
        if self.current is None:
            raise RuntimeError("QwenVisionBlock used outside a pass of QwenVisionRunner.")
        return self.current


def check_units(state: TokenState, m2: int) -> None:
    """Every row's valid tokens are whole merge units: groups of ``m2`` consecutive tokens whose
    positions are ``m2 u, m2 u + 1, ..., m2 u + m2 - 1`` (a cut that splits a unit cannot be merged)."""
    lengths = state.valid_mask().sum(1)
    pos = state.positions.flatten()[packed_index(state)]
    ok = bool((lengths % m2 == 0).all()) and pos.numel() % m2 == 0
    if ok and pos.numel():
        groups = pos.view(-1, m2)
        ok = bool(((groups[:, :1] % m2 == 0) & (groups == groups[:, :1] + torch.arange(m2, device=pos.device))).all())
    if not ok:
        raise ValueError(
            f"The Qwen vision tower merges {m2} patches into one LLM token; a vision hook cut part of a merge unit. "
            f"Cut whole units: give a unit's {m2} patches one score and keep a multiple of {m2} patches."
        )


# --- the runner --------------------------------------------------------------------------------
@dataclass
class MergedTokens:
    """The vision tower's output per image row: ``features [I, K, D_llm]`` (kept merged tokens in
    raster order, valid first), ``units [I, K]`` (each one's unit index in the image's ``t h' w'``
    raster; -1 on padding), ``counts [I]``, ``full_counts [I]`` (units without pruning), and
    ``deepstack [n, I, K, D_llm]`` (Qwen3-VL's DeepStack features of the same kept units) or None."""

    features: Tensor
    units: Tensor
    counts: Tensor
    full_counts: Tensor
    deepstack: Optional[Tensor] = None


class QwenVisionRunner:
    """Qwen2.5-VL (``Qwen2_5_VisionTransformerPretrainedModel``) or Qwen3-VL (``Qwen3VLVisionModel``)
    driven block by block; module docstring. Owns no parameters."""

    tower = Tower.VISION

    def __init__(self, visual: nn.Module) -> None:
        cfg = visual.config
        self.model = visual
        self.merge = int(cfg.spatial_merge_size)
        self.m2 = self.merge * self.merge
        self.patch_size = int(cfg.patch_size)
        self.has_windows = hasattr(visual, "fullatt_block_indexes")
        self.window_units = int(cfg.window_size) // self.merge // self.patch_size if self.has_windows else 0
        full = set(cfg.fullatt_block_indexes) if self.has_windows else None
        taps = list(getattr(visual, "deepstack_visual_indexes", None) or [])
        self.deepstack_layers = taps
        self.ref = GeometryRef(self.m2)
        self.blocks = [
            QwenVisionBlock(blk, self.ref, i, windowed=full is not None and i not in full,
                            tap=visual.deepstack_merger_list[taps.index(i)] if i in taps else None)
            for i, blk in enumerate(visual.blocks)
        ]
        self.num_layers = len(self.blocks)
        self.rotary = visual.rotary_pos_emb
        if self.has_windows and self.window_units < 1:
            unit = self.merge * self.patch_size
            raise ValueError(f"window_size {cfg.window_size} is smaller than one merge unit ({unit} px).")

    # --- embedding --------------------------------------------------------------------------
    def rotary_tables(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin [n, d]`` of patches at ``coords [n, 2]`` (row, column): module docstring."""
        inv = self.rotary.inv_freq.float().to(coords.device)
        scaling = float(getattr(self.rotary, "attention_scaling", 1.0))
        angles = (coords.float()[..., None] * inv).flatten(1)  # [n, 2 * d/4]: rows' then columns'
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * scaling, angles.sin() * scaling

    def embed(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[TokenState, VisionGeometry]:
        """Patch embedding (plus Qwen3-VL's interpolated position embedding) of the flattened
        ``pixel_values [sum t h w, C T p p]``, one row per image in attention order; and the pass's
        geometry."""
        m = self.model
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        counts = [t * h * w for t, h, w in grids]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw gives {sum(counts)}."
            )
        weight = m.patch_embed.proj.weight
        x = m.patch_embed(pixel_values.to(weight.dtype))
        device, n0, nimg = x.device, max(counts), len(grids)
        rows = torch.zeros(nimg, n0, x.shape[-1], dtype=x.dtype, device=device)
        order = torch.zeros(nimg, n0, dtype=torch.long, device=device)
        d = int(self.blocks[0].attn.head_dim)
        cos = torch.zeros(nimg, n0, d, device=device)
        sin = torch.zeros(nimg, n0, d, device=device)
        frame = torch.zeros(nimg, n0, dtype=torch.long, device=device)
        window = torch.zeros(nimg, n0, dtype=torch.long, device=device) if self.has_windows else None
        start = 0
        for i, (grid, count) in enumerate(zip(grids, counts)):
            coords = patch_coords(grid, self.merge, device)
            feats = x[start : start + count]
            if hasattr(m, "pos_embed"):
                table = interpolated_pos_embed(m.pos_embed.weight, coords[:, 1:], grid[1], grid[2])
                feats = feats + table.to(feats.dtype)
            perm = torch.arange(count, device=device)
            if window is not None:
                wid = window_ids(grid, self.merge, self.window_units, device)
                window[i, :count] = wid
                units = torch.sort(wid[:: self.m2], stable=True).indices
                perm = (units[:, None] * self.m2 + torch.arange(self.m2, device=device)).flatten()
            rows[i, :count] = feats[perm]
            order[i, :count] = perm
            cos[i, :count], sin[i, :count] = self.rotary_tables(coords[:, 1:])
            frame[i, :count] = coords[:, 0]
            start += count
        lengths = torch.tensor(counts, device=device)
        types = torch.full((n0,), int(TokenType.PATCH), dtype=torch.int8, device=device)
        state = TokenState(x=rows, types=types, lengths=None if len(set(counts)) == 1 else lengths, positions=order)
        stride = 1 + int(max(frame.max(), window.max() if window is not None else 0))
        return state, VisionGeometry(cos, sin, frame, window, order, stride)

    # --- the pass ---------------------------------------------------------------------------
    def run(self, pixel_values: Tensor, grid_thw: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> MergedTokens:
        """Every block with ``hooks`` (vision hooks, e.g. pruners), then the merger on the kept units,
        in raster order per image."""
        state, geo = self.embed(pixel_values, grid_thw)
        self.ref.current = geo
        try:
            image_index = torch.arange(state.x.shape[0], device=state.x.device)
            run = TowerPass(self.tower, self.blocks, [*(hooks or ()), PositionTracker(geo)], image_index, token_group=self.m2)
            state = run.run(run.start(state))
            return self.merge_tokens(state, grid_thw, geo)
        finally:
            self.ref.current = None

    def merge_tokens(self, state: TokenState, grid_thw: Tensor, geo: VisionGeometry) -> MergedTokens:
        """The merger over each row's kept units, scattered to raster order (the un-permute), and
        the DeepStack taps gathered at the same units."""
        check_units(state, self.m2)
        b, n, _ = state.x.shape
        index = packed_index(state)
        rows = (index // n)[:: self.m2]
        units = state.positions.flatten()[index][:: self.m2] // self.m2
        merged = self.model.merger(state.x.flatten(0, 1)[index])
        full = (grid_thw.prod(-1) // self.m2).to(merged.device)
        width = int(full.max())
        kept = torch.zeros(b, width, dtype=torch.bool, device=merged.device)
        kept[rows, units] = True
        counts = kept.sum(1)
        k = int(counts.max()) if counts.numel() else 0
        order = kept_first(kept, k)
        valid = torch.arange(k, device=merged.device)[None] < counts[:, None]

        def gather(feats: Tensor, f_rows: Tensor, f_units: Tensor) -> Tensor:
            dense = feats.new_zeros(b, width, feats.shape[-1])
            dense[f_rows, f_units] = feats
            out = torch.gather(dense, 1, order[..., None].expand(-1, -1, feats.shape[-1]))
            return out.masked_fill(~valid[..., None], 0.0)

        deepstack = None
        if self.deepstack_layers:
            taps = sorted(geo.deepstack, key=lambda t: self.deepstack_layers.index(t[0]))
            if len(taps) != len(self.deepstack_layers):
                raise RuntimeError(f"DeepStack taps at {self.deepstack_layers} but {len(taps)} recorded.")
            deepstack = torch.stack([gather(f, r, u) for _, f, r, u in taps])
        return MergedTokens(gather(merged, rows, units), order.masked_fill(~valid, -1), counts, full, deepstack)
