"""scripts/show_kept.py (vlm.kept_picture) on a tiny random LLaVA-1.5 (4 x 4 patches of 8 px, CLS
excluded): the PNG's dimmed patch cells are exactly the ones the pruner dropped, with the kept
indices computed independently (the runner's own kept positions, and the LLM cut's kept rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import kept_picture as kp

LLM_CUT = ["--model.init_args.pruner.init_args.crop_tokens", "12", "--model.init_args.pruner.init_args.layer", "0"]


def _cells(png: Path, pic: kp.KeptPicture, panel: int, source: np.ndarray) -> set[tuple[int, int]]:
    """The cells of ``panel`` in the written PNG that hold the source pixels (kept); every other cell
    must hold them dimmed."""
    arr = np.asarray(Image.open(png).convert("RGB")).astype(np.float32)
    x0, y0 = pic.panels[panel]
    s, p = pic.scale, pic.patch
    kept = set()
    for r in range(pic.grid[0]):
        for c in range(pic.grid[1]):
            cell = arr[y0 + r * p * s : y0 + (r + 1) * p * s : s, x0 + c * p * s : x0 + (c + 1) * p * s : s]
            src = source[r * p : (r + 1) * p, c * p : (c + 1) * p].astype(np.float32)
            if np.abs(cell - src).max() <= 2:
                kept.add((r, c))
            else:
                assert np.abs(cell - np.round(src * kp.DIM)).max() <= 2, (panel, r, c)
    return kept


def _pixel_values(model, image: Image.Image) -> torch.Tensor:
    return model.backbone.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def test_dimmed_patches_are_the_vision_pruners_cut(tiny_llava_files, tmp_path: Path) -> None:
    files = tiny_llava_files
    out = tmp_path / "kept.png"
    model = kp.build_model([str(files["model"])], ["--model.init_args.pruner.class_path", "vtc_cls",
                                                   "--model.init_args.pruner.init_args.num_tokens", "6"])
    pic = kp.render(kp.record(model, Image.open(files["root"] / "1.png").convert("RGB"), "w1 w2")[0], out)
    assert len(pic.stages) == 1 and pic.grid == (4, 4) and pic.patch == 8
    source = np.asarray(Image.open(files["root"] / "1.png").convert("RGB"))  # 32 px: the model's own view
    # independently: the pruner alone through the runner's vision tower; kept patch indices (CLS dropped)
    visual = model.backbone.runner.encode_images(_pixel_values(model, Image.open(files["root"] / "1.png").convert("RGB")),
                                                 [model.pruner])
    expected = {divmod(int(i), 4) for i in visual.positions[0, : int(visual.counts[0])]}
    assert len(expected) == 6
    assert _cells(out, pic, 0, source) == expected == pic.stages[0].kept


def test_llm_stage_cut_is_mapped_back_to_the_patch_grid(tiny_llava_files, tmp_path: Path) -> None:
    files = tiny_llava_files
    out = tmp_path / "kept_llm.png"
    model = kp.build_model([str(files["model"])], ["--model.init_args.pruner.class_path", "flowcut_llm",
                                                   "--model.init_args.pruner.init_args.num_tokens", "4", *LLM_CUT])
    pic = kp.render(kp.record(model, Image.open(files["root"] / "2.png").convert("RGB"), "w3 w4")[0], out)
    assert [s.label.split(":")[0] for s in pic.stages][-1] == "LLM layer 0" and len(pic.stages) >= 2
    source = np.asarray(Image.open(files["root"] / "2.png").convert("RGB"))
    backbone = model.backbone
    enc = backbone.encode(backbone.prompts(["w3 w4"], [1]), [Image.open(files["root"] / "2.png").convert("RGB")])
    # the vision stage alone: slot j of the LLM's visual tokens is patch positions[j]
    visual = backbone.runner.encode_images(enc["pixel_values"], [model.pruner.vision_stage])
    slots = [divmod(int(i), 4) for i in visual.positions[0, : int(visual.counts[0])]]
    assert set(slots) == pic.stages[-2].kept == _cells(out, pic, len(pic.stages) - 2, source)
    # the LLM cut: the assembled sequence's visual rows that survive (LlmCut.index)
    gen = backbone.generate(enc, [model.pruner], 1)
    rows = gen.inputs.visual_mask[0].nonzero().flatten().tolist()
    kept_rows = set(gen.inputs.cut.index[0].tolist())
    expected = {slots[j] for j, row in enumerate(rows) if row in kept_rows}
    assert len(expected) == 4
    assert _cells(out, pic, len(pic.stages) - 1, source) == expected == pic.stages[-1].kept


def test_no_pruner_keeps_every_patch(tiny_llava_files, tmp_path: Path) -> None:
    pic = kp.show_kept([str(tiny_llava_files["model"])], tiny_llava_files["root"] / "0.png", "w1", tmp_path / "k.png",
                       "none")
    assert len(pic.stages) == 1 and len(pic.stages[0].kept) == 16


def test_unknown_pruner_lists_the_available_ones(tiny_llava_files, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown pruner 'nope'; available: .*vtc_cls"):
        kp.show_kept([str(tiny_llava_files["model"])], tiny_llava_files["root"] / "0.png", "w1", tmp_path / "k.png", "nope")


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_merge_units_are_drawn_on_the_patch_grid(kind: str, tmp_path: Path) -> None:
    """Qwen: the picture's patch grid is the processor's (``image_grid_thw``) and every kept merge
    unit of the vision cut is drawn as its 2x2 patch cells; expected from the runner's own kept units
    (raster unit ids), mapped to cells here: unit u is row ``u // (w/2)``, column ``u % (w/2)``."""
    from tests.qwen.tiny import tiny_model, tiny_processor
    from vlm import pruning
    from vlm.backbones import Qwen2_5VLBackbone, Qwen3VLBackbone
    from vlm.modules.llava_eval import LlavaEval

    tiny_model(kind).save_pretrained(tmp_path / "model")
    tiny_processor(kind).save_pretrained(tmp_path / "model")
    cls = {"qwen2_5_vl": Qwen2_5VLBackbone, "qwen3_vl": Qwen3VLBackbone}[kind]
    model = LlavaEval(cls(model=str(tmp_path / "model")), pruner=pruning.create("vtc_cls", num_tokens=3), max_new_tokens=1)
    patch = 14 if kind == "qwen2_5_vl" else 16
    image = Image.fromarray((np.random.default_rng(3).random((4 * patch, 6 * patch, 3)) * 255).astype("uint8"))
    pic = kp.render(kp.record(model, image, "w1 w2")[0], tmp_path / "kept.png")
    assert pic.grid == (4, 6) and pic.patch == patch and len(pic.stages) == 1
    enc = model.backbone.encode(model.backbone.prompts(["w1 w2"], [1]), [image])
    with torch.no_grad():
        out = model.backbone.runner.vision.run(enc["pixel_values"], enc["image_grid_thw"], [model.pruner])
    units = out.units[0, : int(out.counts[0])].tolist()
    expected = {(2 * (u // 3) + a, 2 * (u % 3) + b) for u in units for a in (0, 1) for b in (0, 1)}
    assert len(units) == 3 and pic.stages[0].kept == expected


def test_multi_cut_llm_pruner_gets_one_panel_per_cut(tiny_llava_files, tmp_path: Path) -> None:
    """PyramidDrop's two LLM cuts (after layers 0 and 1 of a 3-layer copy of the tiny model): one
    panel each, nested, with the counts of its schedule; the last panel is the generation's own final
    cut (the surviving rows of ``LlmCut.index``), computed without the picture code."""
    import yaml

    base = yaml.safe_load(tiny_llava_files["model"].read_text())
    base["model"]["init_args"]["backbone"]["init_args"]["config"]["text_config"]["num_hidden_layers"] = 3
    config = tmp_path / "model3.yaml"
    config.write_text(yaml.safe_dump(base))
    model = kp.build_model([str(config)], ["--model.init_args.pruner.class_path", "pyramiddrop",
                                           "--model.init_args.pruner.init_args.layers", "[1, 2]",
                                           "--model.init_args.pruner.init_args.ratios", "[0.5, 0.25]",
                                           "--model.init_args.pruner.init_args.num_layers", "3",
                                           "--model.init_args.pruner.init_args.reference_tokens", "16"])
    image = Image.open(tiny_llava_files["root"] / "3.png").convert("RGB")
    out = tmp_path / "kept_pdrop.png"
    pic = kp.render(kp.record(model, image, "w1 w3")[0], out)
    assert [s.label.split(":")[0] for s in pic.stages] == ["LLM layer 0", "LLM layer 1"]
    first, second = (s.kept for s in pic.stages)
    assert len(first) == 8 and len(second) == 4 and second < first
    source = np.asarray(image)
    assert _cells(out, pic, 0, source) == first and _cells(out, pic, 1, source) == second
    backbone = model.backbone
    enc = backbone.encode(backbone.prompts(["w1 w3"], [1]), [image])
    gen = backbone.generate(enc, [model.pruner], 1)
    rows = gen.inputs.visual_mask[0].nonzero().flatten().tolist()  # row j holds patch j (no vision cut)
    kept_rows = set(gen.inputs.cut.index[0].tolist())
    assert {divmod(j, 4) for j, row in enumerate(rows) if row in kept_rows} == second
