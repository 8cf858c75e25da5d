"""Which visual tokens a pruner keeps, as a picture (``scripts/show_kept.py`` is the command line).

The model is run once on one image and one question (greedy answer, as ``vlm test`` does). Nothing
shared is changed to observe the cuts:

* a :class:`KeptRecorder` (a vision :class:`~vlm.hooks.TowerHook`) is appended after the pruner; its
  ``after_block`` reads ``state.positions`` (each token's index in the tower's original sequence)
  and records a *cut stage* whenever a block left fewer tokens than the one before (every vision
  cut: one for a single-cut pruner, several for a progressive pruner that cuts after many blocks);
* an LLM-stage pruner's ``keep(probe)`` is wrapped on the instance for the one run: its ``[B, N]``
  mask over the visual slots is mapped back to patches through the kept tokens' original positions
  (the slots are the tokens that left the vision tower: LLaVA in the tower's order, Qwen in raster
  unit order). A multi-cut pruner gives one panel per cut, each cut's mask
  applied to the slots the cut before it left; tokens a cut *merges* into new ones (a stage's
  ``merge_stage``) stand for several patches and are not drawn (their panel shows the patches kept as
  themselves).

The picture is the image *as the model saw it* (rebuilt from ``pixel_values``: the processor's
resize/crop, un-normalised), one panel per cut stage, pruned patches dimmed to :data:`DIM` of their
value. Grids: LLaVA-1.5 one ``g x g`` patch grid (CLS excluded); Qwen2.5-VL / Qwen3-VL the
``image_grid_thw`` patch grid, whose ``2 x 2`` merge units are kept or cut together; LLaVA-NeXT
(anyres) shows the base view only (its first crop; sub-crops are not drawn), and an LLM-stage cut
there as the base view's share of the kept slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from vlm.context import BlockContext, Tower, TowerContext
from vlm.hooks import TowerHook
from vlm.tokens import TokenState, TokenType

#: a pruned patch's pixels are multiplied by this
DIM = 0.25
#: panels are enlarged by a whole factor until their shorter side is at least this (pixels)
MIN_SIDE = 224
TITLE_H, GAP = 22, 8


def _snapshot(state: TokenState) -> list[list[int]]:
    """Per batch row: the original positions of its valid patch tokens, in the state's order."""
    keep = state.valid_mask() & (state.batch_types == int(TokenType.PATCH))
    return [state.positions[b][keep[b]].tolist() for b in range(state.x.shape[0])]


class KeptRecorder(TowerHook):
    """Records the patch tokens left after every vision block that cut some (``cuts``: ``(layer,
    positions per row)``) and after the last block (``final``). Append it after the pruner."""

    towers = (Tower.VISION,)

    def __init__(self) -> None:
        super().__init__()
        self.cuts: list[tuple[int, list[list[int]]]] = []
        self.initial: Optional[list[list[int]]] = None
        self.final: Optional[list[list[int]]] = None
        self._counts: Optional[list[int]] = None

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        self.cuts, self.initial, self.final = [], _snapshot(state), None
        self._counts = [len(r) for r in self.initial]
        return state

    def after_block(self, ctx: BlockContext, state: TokenState, attn: Any) -> TokenState:
        snap = _snapshot(state)
        counts = [len(r) for r in snap]
        if counts != self._counts:
            self.cuts.append((ctx.layer, snap))
            self._counts = counts
        self.final = snap
        return state


@dataclass
class Stage:
    """One panel: ``label`` and the kept patch cells ``(row, col)`` of the grid."""

    label: str
    kept: set[tuple[int, int]]


@dataclass
class KeptPicture:
    """What :func:`show_kept` drew: the model-input ``image [H, W, 3]`` uint8, the patch size and
    grid, the stages, the answer, and where each panel is in the PNG (``panels``: ``(x0, y0)`` of
    its image area, enlarged ``scale`` times)."""

    image: np.ndarray
    patch: int
    grid: tuple[int, int]
    stages: list[Stage]
    answer: str
    scale: int = 1
    panels: list[tuple[int, int]] = field(default_factory=list)


# --- building the model from configs -------------------------------------------------------------
def build_model(configs: Sequence[str], overrides: Sequence[str] = ()) -> Any:
    """The ``model`` of composed ``vlm`` configs (``--config`` files left to right, then
    ``overrides`` such as ``--model.init_args.pruner.class_path <name>``; short pruner names
    allowed). Other top-level sections (``data``, ``trainer``, ...) are read and ignored."""
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    from vlm.runtime.shortnames import expand_args, install_short_name_loader

    install_short_name_loader()
    parser = ArgumentParser(default_env=False, prog="show_kept")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    for key in ("data", "trainer", "ckpt_path", "seed_everything", "allow_untrained", "optimizer", "lr_scheduler"):
        parser.add_argument(f"--{key}", type=Optional[Any], default=None)
    args = [a for c in configs for a in ("--config", str(c))] + list(overrides)
    cfg = parser.parse_args(expand_args(args))
    return parser.instantiate_classes(cfg).model


# --- the model's view of the image ---------------------------------------------------------------
def _unnormalise(chw: Tensor, processor: Any) -> np.ndarray:
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
    img = (chw.float().cpu() * std + mean).clamp(0, 1)
    return (img * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


class _Geometry:
    """The image as the model saw it, its patch grid, and patch index -> (row, col)."""

    def __init__(self, backbone: Any, enc: dict[str, Tensor]) -> None:
        self.qwen = "image_grid_thw" in enc
        pv = enc["pixel_values"]
        if self.qwen:
            from vlm.towers.qwen_vision import patch_coords

            ip = backbone.processor.image_processor
            p, m = int(ip.patch_size), int(ip.merge_size)
            t, h, w = (int(v) for v in enc["image_grid_thw"][0])
            n = t * h * w
            c = pv.shape[1] // (int(ip.temporal_patch_size) * p * p)
            patches = pv[:n].float().cpu().view(n, c, int(ip.temporal_patch_size), p, p)[:, :, 0]
            self.coords = patch_coords((t, h, w), m)
            canvas = torch.zeros(h, w, c, p, p)
            first = self.coords[:, 0] == 0  # first frame (an image has one)
            canvas[self.coords[first, 1], self.coords[first, 2]] = patches[first]
            self.image = _unnormalise(canvas.permute(2, 0, 3, 1, 4).reshape(c, h * p, w * p), backbone.processor)
            self.patch, self.grid, self.m2, self.offset = p, (h, w), m * m, 0
        else:
            view = pv[0, 0] if pv.dim() == 5 else pv[0]  # LLaVA-NeXT: the base view
            emb = backbone.runner.vision.model.embeddings
            g = int(round(math.sqrt(int(emb.num_patches))))
            self.image = _unnormalise(view, backbone.processor)
            self.patch, self.grid, self.m2 = int(self.image.shape[0]) // g, (g, g), 1
            self.offset = 1  # sequence index 0 is CLS: patch index = position - 1

    def cells(self, positions: Sequence[int]) -> set[tuple[int, int]]:
        """Grid cells of tokens at original ``positions`` (the vision tower's sequence indices)."""
        out = set()
        for pos in positions:
            i = int(pos) - self.offset
            if i < 0:
                continue
            if self.qwen:
                f, r, c = (int(v) for v in self.coords[i])
                if f == 0:
                    out.add((r, c))
            else:
                out.add(divmod(i, self.grid[1]))
        return out

    def llm_slots(self, final: list[int]) -> list[list[int]]:
        """For each visual slot the LLM sees (of this image), the original positions it stands for:
        LLaVA one token in the tower's order; Qwen one merge unit (its ``m^2`` patches) in raster order."""
        if not self.qwen:
            return [[p] for p in final]
        units = sorted({int(p) // self.m2 for p in final})
        return [[u * self.m2 + j for j in range(self.m2)] for u in units]


# --- running and drawing -------------------------------------------------------------------------
def record(model: Any, image: Any, question: str, max_new_tokens: Optional[int] = None) -> tuple[KeptPicture, Any]:
    """Run ``model`` (a ``LlavaEval``) once on ``image`` (a PIL image) and ``question``; return the
    stages (without the panel layout) and the generation."""
    from vlm.llm_stage import split_stages

    backbone = model.backbone
    recorder = KeptRecorder()
    hooks = [*model.hooks, recorder]
    stage = split_stages(model.hooks).llm
    seen: list[Tensor] = []  # each LLM cut's keep mask, in cut order
    if stage is not None:
        original = stage.keep_stage

        def keep_stage(probe: Any, index: int) -> Tensor:
            mask = original(probe, index)
            seen.append(mask.detach().cpu())
            return mask

        stage.keep_stage = keep_stage  # this instance, this run only
    try:
        prompts = backbone.prompts([question], [1], model.prompt_template)
        device = next(backbone.model.parameters()).device
        enc = {k: v.to(device) for k, v in backbone.encode(prompts, [image]).items()}
        with torch.no_grad():
            gen = backbone.generate(enc, hooks, max_new_tokens or model.max_new_tokens)
    finally:
        if stage is not None:
            del stage.keep_stage
    answer = backbone.decode(gen.tokens)[0]
    geo = _Geometry(backbone, enc)
    stages = [Stage(f"vision block {layer}: {len(geo.cells(rows[0]))}/{geo.grid[0] * geo.grid[1]} patches kept",
                    geo.cells(rows[0])) for layer, rows in recorder.cuts]
    slots = geo.llm_slots(recorder.final[0]) if seen else []
    for layer, mask in zip(stage.cuts() if stage is not None else (), seen):
        # a cut's slots are the visual tokens left by the cut before it, in order (LLaVA-NeXT: the
        # base view's slots come first)
        keep = mask[0, : len(slots)].tolist()
        slots = [s for s, k in zip(slots, keep) if k]
        stages.append(Stage(f"LLM layer {layer}: {int(mask[0].sum())} visual tokens kept",
                            geo.cells([p for s in slots for p in s])))
    if not stages:
        stages = [Stage("no cut: every patch kept", geo.cells(recorder.initial[0]))]
    return KeptPicture(geo.image, geo.patch, geo.grid, stages, answer), gen


def render(pic: KeptPicture, path: str | Path, dim: float = DIM) -> KeptPicture:
    """Write the panels side by side (white background, a title band above each) as a PNG."""
    from PIL import Image, ImageDraw

    h, w = pic.image.shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / min(h, w)))
    ph, pw = h * scale, w * scale
    n = len(pic.stages)
    canvas = Image.new("RGB", (n * pw + (n + 1) * GAP, ph + TITLE_H + 2 * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    pic.scale, pic.panels = scale, []
    for i, stage in enumerate(pic.stages):
        img = pic.image.astype(np.float32)
        factor = np.full((pic.grid[0], pic.grid[1]), dim, dtype=np.float32)
        for r, c in stage.kept:
            factor[r, c] = 1.0
        factor = np.kron(factor, np.ones((pic.patch, pic.patch), dtype=np.float32))[:h, :w, None]
        panel = Image.fromarray(np.round(img * factor).astype(np.uint8))
        if scale > 1:
            panel = panel.resize((pw, ph), Image.NEAREST)
        x0, y0 = GAP + i * (pw + GAP), GAP + TITLE_H
        canvas.paste(panel, (x0, y0))
        draw.text((x0, GAP), stage.label[: max(8, pw // 6)], fill="black")
        pic.panels.append((x0, y0))
    canvas.save(str(path), format="PNG")
    return pic


def show_kept(
    configs: Sequence[str],
    image: str | Path,
    question: str,
    out: str | Path,
    pruner: Optional[str] = None,
    num_tokens: Optional[int] = None,
    overrides: Sequence[str] = (),
    max_new_tokens: Optional[int] = None,
) -> KeptPicture:
    """Build the model of ``configs`` (``pruner``/``num_tokens`` override its pruner), run it on
    ``image`` and ``question``, and write the picture to ``out``."""
    from PIL import Image

    extra: list[str] = []
    if pruner is not None:
        extra += ["--model.init_args.pruner", "null"] if pruner == "none" else ["--model.init_args.pruner.class_path", pruner]
    if num_tokens is not None:
        extra += ["--model.init_args.pruner.init_args.num_tokens", str(num_tokens)]
    extra += list(overrides)  # after the pruner's class, so they may set its other arguments
    if pruner not in (None, "none"):
        import vlm.pruning

        if pruner not in vlm.pruning.available():
            raise ValueError(f"unknown pruner {pruner!r}; available: {', '.join(vlm.pruning.available())}.")
    model = build_model(configs, extra).eval()
    pic, _ = record(model, Image.open(image).convert("RGB"), question, max_new_tokens)
    return render(pic, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="show_kept.py",
        description="Run a model once on an image and draw which patches each cut keeps (pruned ones dimmed). "
                    "Other arguments (e.g. --model.init_args.pruner.init_args.layer 2) go to the model config.",
    )
    p.add_argument("--config", action="append", required=True, help="model config(s), composed left to right")
    p.add_argument("--pruner", default=None, help="a pruner name (vlm.pruning.available()) or none; default: the config's")
    p.add_argument("--num_tokens", type=int, default=None, help="the pruner's budget")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="kept.png")
    p.add_argument("--max_new_tokens", type=int, default=None)
    args, overrides = p.parse_known_args(argv)
    pic = show_kept(args.config, args.image, args.question, args.out, args.pruner, args.num_tokens, overrides,
                    args.max_new_tokens)
    for s in pic.stages:
        print(s.label)
    print(f"answer: {pic.answer!r}\nwrote {args.out}")
    return 0
