"""Spatial downsampling (pruning/spatial.py) against a plain implementation: the patch grid cut
into adaptive-pooling cells (rows ``floor(i h / h') .. ceil((i + 1) h / h') - 1``, columns alike),
each cell's mean (``pool``) or top-left patch (``stride``) at the top-left patch's position, written
as Python loops over the libraries' own hidden states (transformers' ``hidden_states``, timm's blocks)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.llava.tiny import TINY_LLAVA_CONFIG
from tests.pruning.test_formulas import check_batch_invariance, check_budget_in_raster_order, formula_setup
from vlm import pruning
from vlm.backbones import ViTBackbone
from vlm.modules.vit_classifier import ViTClassifier


def plain_spatial(patches: torch.Tensor, h: int, w: int, oh: int, ow: int, mode: str) -> tuple[list[int], torch.Tensor]:
    """(kept patch indices, their values ``[oh ow, D]``) of one image's ``patches [h w, D]``."""
    kept, values = [], []
    for i in range(oh):
        r0, r1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, math.ceil((j + 1) * w / ow)
            kept.append(r0 * w + c0)
            cell = [patches[r * w + c] for r in range(r0, r1) for c in range(c0, c1)]
            values.append(sum(cell) / len(cell) if mode == "pool" else patches[r0 * w + c0])
    return kept, torch.stack(values)


@pytest.fixture(scope="module")
def setup():
    return formula_setup()


@pytest.mark.parametrize("mode", ["pool", "stride"])
@pytest.mark.parametrize("budget,cells", [(9, (3, 3)), (10, (2, 5)), (4, (2, 2))])
@torch.no_grad()
def test_llava_cells_equal_the_plain_pooling(setup, budget, cells, mode):
    """Tiny LLaVA, a 6x6 grid at the feature layer: 3x3 cells of 2x2, 2x5 overlapping cells."""
    runner, pixels = setup
    pruner = pruning.create("spatial_pool", num_tokens=budget, mode=mode)
    state = runner.vision.hidden_state(pixels, runner.feature_layer, [pruner])
    hidden = runner.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states[runner.feature_layer]
    assert state.x.shape[1] == 1 + budget and state.lengths is None
    for i in range(pixels.shape[0]):
        kept, values = plain_spatial(hidden[i, 1:], 6, 6, *cells, mode)
        assert (state.positions[i, 1:] - 1).tolist() == kept
        torch.testing.assert_close(state.x[i, 1:], values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.x[i, 0], hidden[i, 0], atol=1e-5, rtol=1e-5)  # CLS kept unchanged
    visual = runner.encode_images(pixels, [pruning.create("spatial_pool", num_tokens=budget, mode=mode)])
    assert visual.counts.tolist() == [budget] * 3
    torch.testing.assert_close(visual.features[:, :budget], runner.projector(state.x[:, 1:]), atol=1e-5, rtol=1e-5)


def test_budget_raster_order_and_batch_invariance(setup):
    check_budget_in_raster_order(*setup, "spatial_pool", dict(num_tokens=6))
    check_batch_invariance(*setup, "spatial_pool", dict(num_tokens=6))


def test_output_grid_and_bad_budgets(setup):
    from vlm.pruning.spatial import output_grid

    assert [output_grid(n, 24, 24) for n in (576, 64, 128, 192, 144)] == [(24, 24), (8, 8), (8, 16), (12, 16), (12, 12)]
    assert output_grid(8, 4, 8) == (2, 4) and output_grid(7, 6, 7) == (1, 7)
    runner, pixels = setup
    with pytest.raises(ValueError, match="no grid of exactly num_tokens=7"):
        runner.encode_images(pixels, [pruning.create("spatial_pool", num_tokens=7)])
    with pytest.raises(ValueError, match="mode must be one of"):
        pruning.create("spatial_pool", mode="max")
    full = runner.encode_images(pixels[:1], [pruning.create("spatial_pool", num_tokens=36)])
    assert full.positions[0].tolist() == list(range(36))  # a budget of every patch keeps them all


@torch.no_grad()
def test_vit_classifier_pools_the_grid_and_is_batch_invariant():
    """timm ViT (8x8 patches, CLS): 12 cells (3x4) after the last block; the classifier's final norm
    follows, and an image's logits are the same alone as in the batch."""
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 64, "patch_size": 8, "global_pool": "avg"})
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    state = bb.vision.forward_features(images, [pruning.create("spatial_pool", num_tokens=12)])
    m = bb.model
    x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
    for blk in m.blocks:
        x = blk(x)
    for i in range(3):
        kept, values = plain_spatial(x[i, m.num_prefix_tokens :], 8, 8, 3, 4, "pool")
        assert (state.positions[i, 1:] - 1).tolist() == kept
        torch.testing.assert_close(state.x[i, 1:], m.norm(values), atol=1e-5, rtol=1e-5)
    module = ViTClassifier(bb, num_classes=4, pruner=pruning.create("spatial_pool", num_tokens=12, layer=1)).eval()
    together = module(images)["logits"]
    for i in range(3):
        torch.testing.assert_close(together[i], module(images[i : i + 1])["logits"][0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_qwen_towers_raise_a_clear_error():
    from tests.qwen.tiny import encode, tiny_model
    from vlm.towers.qwen import QwenRunner

    model = tiny_model("qwen3_vl")
    enc = encode("qwen3_vl", "right")
    with pytest.raises(TypeError, match="merges 4 patches per token over per-image dynamic grids"):
        QwenRunner(model).vision.run(enc["pixel_values"], enc["image_grid_thw"], [pruning.create("spatial_pool", num_tokens=3)])


def test_llava_generates_with_the_pruner():
    """End to end on the tiny LLaVA (4x4 grid): 4 pooled tokens reach the LLM."""
    from vlm.backbones import LlavaBackbone

    torch.manual_seed(0)
    backbone = LlavaBackbone(config=TINY_LLAVA_CONFIG)
    ids = torch.tensor([[1, 7] + [5] * 16 + [9, 10]] * 2)
    with torch.no_grad():
        gen = backbone.runner.generate(ids, torch.randn(2, 3, 32, 32), torch.ones_like(ids), max_new_tokens=2,
                                       hooks=[pruning.create("spatial_pool", num_tokens=4)])
    assert gen.tokens.shape == (2, 2) and gen.inputs.visual_counts.tolist() == [4, 4]
