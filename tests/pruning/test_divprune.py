"""DivPrune (pruning/divprune.py) against a plain implementation of the released code's rule
(github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``), image by image, in Python loops:

    d(i, j) = 1 - cos(f_i, f_j); first token: argmax_j of the second smallest d(., j) (the diagonal
    included); then repeatedly argmax_j min_{i selected} d(i, j); ties: the earlier token; kept
    tokens sorted.

The features are taken from the libraries' own forwards (transformers' ``hidden_states``, timm's
blocks, the Qwen merger's input), never from our runners."""

from __future__ import annotations

import math

import pytest
import torch

from tests.llava.tiny import TINY_LLAVA_CONFIG
from tests.pruning.test_formulas import PATCHES, check_batch_invariance, check_budget_in_raster_order, formula_setup
from vlm import pruning
from vlm.backbones import ViTBackbone
from vlm.modules.vit_classifier import ViTClassifier


def plain_divprune(feats: torch.Tensor, k: int) -> list[int]:
    """The official greedy rule on the rows of ``feats [n, F]`` (float64 Python loops)."""
    rows = feats.double().tolist()
    n = len(rows)
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    dist = [[1.0 - sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]

    def first_max(values: list[float]) -> int:
        best = 0
        for j, v in enumerate(values):
            if v > values[best]:
                best = j
        return best

    chosen = [first_max([sorted(dist[i][j] for i in range(n))[1] for j in range(n)])]
    while len(chosen) < min(k, n):
        score = [min(dist[i][j] for i in chosen) if j not in chosen else -math.inf for j in range(n)]
        chosen.append(first_max(score))
    return sorted(chosen)


@pytest.fixture(scope="module")
def setup():
    return formula_setup()


@pytest.mark.parametrize("budget", [5, 12])
@torch.no_grad()
def test_llava_kept_patches_equal_the_plain_rule(setup, budget):
    """Tiny LLaVA (36 patches, feature layer -2): the features are ``hidden_states[-2]`` without CLS."""
    runner, pixels = setup
    visual = runner.encode_images(pixels, [pruning.create("divprune", num_tokens=budget)])
    hidden = runner.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states[runner.feature_layer]
    for i in range(pixels.shape[0]):
        got = visual.positions[i, : int(visual.counts[i])].tolist()
        assert got == plain_divprune(hidden[i, 1:], budget)
        assert len(got) == budget


def test_budget_raster_order_and_batch_invariance(setup):
    check_budget_in_raster_order(*setup, "divprune", dict(num_tokens=7))
    check_batch_invariance(*setup, "divprune", dict(num_tokens=7))


@torch.no_grad()
def test_vit_classifier_keeps_the_plain_rule_at_an_inner_layer():
    """timm ViT (8x8 patches, CLS): cut after block 1, features = timm's own block outputs; the
    classifier's logits of an image are the same alone as in the batch."""
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 64, "patch_size": 8, "global_pool": "avg"})
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pruner = pruning.create("divprune", num_tokens=10, layer=1)
    state = bb.vision.forward_features(images, [pruner])
    m = bb.model
    x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
    for blk in m.blocks[:2]:
        x = blk(x)
    assert state.x.shape[1] == 1 + 10
    for i in range(3):
        assert (state.positions[i, 1:] - 1).tolist() == plain_divprune(x[i, m.num_prefix_tokens :], 10)
    module = ViTClassifier(bb, num_classes=4, pruner=pruning.create("divprune", num_tokens=10, layer=1)).eval()
    together = module(images)["logits"]
    for i in range(3):
        torch.testing.assert_close(together[i], module(images[i : i + 1])["logits"][0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_image_selects_jointly_over_the_crops_of_an_image(setup):
    """``per_image``: rows naming the same image (LLaVA-NeXT crops) share one selection of
    ``num_tokens`` x crops over all their patches; the total is met, per-crop counts are ragged."""
    runner, pixels = setup
    image_index = torch.tensor([0, 0, 1])
    pruner = pruning.create("divprune", num_tokens=6, per_image=True)
    state = runner.vision.hidden_state(pixels, runner.feature_layer, [pruner], image_index)
    hidden = runner.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states[runner.feature_layer]
    kept = [(state.positions[r, : int(state.lengths[r]) if state.lengths is not None else None] - 1).tolist() for r in range(3)]
    joint = plain_divprune(torch.cat([hidden[0, 1:], hidden[1, 1:]]), 12)
    assert [p for p in kept[0] if p >= 0] == [j for j in joint if j < PATCHES]
    assert [p for p in kept[1] if p >= 0] == [j - PATCHES for j in joint if j >= PATCHES]
    assert [p for p in kept[2] if p >= 0] == plain_divprune(hidden[2, 1:], 6)
    assert pruner.cut_layers(7) == ([6], True)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_qwen_units_follow_the_plain_rule_on_the_merger_input(kind):
    """Qwen: a unit's feature is its four patches' final hidden states concatenated (the merger's
    input, read with a hook on transformers' own forward); whole units are kept."""
    from tests.qwen.tiny import encode, tiny_model
    from vlm.towers.qwen import QwenRunner

    model = tiny_model(kind)
    enc = encode(kind, "right")
    grid = enc["image_grid_thw"]
    seen = {}
    merger = model.model.visual.merger
    h1 = merger.register_forward_pre_hook(lambda mod, args: seen.__setitem__("in", args[0]))
    h2 = merger.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out))
    try:
        ref = model.model.get_image_features(enc["pixel_values"], grid).pooler_output
    finally:
        h1.remove(), h2.remove()
    units_in = seen["in"].reshape(-1, 4 * seen["in"].shape[-1])  # merger order (Qwen2.5: windows)
    raster = torch.cat(list(ref))
    order = torch.cdist(raster, seen["out"]).argmin(1)  # raster unit r is merger row order[r]
    feats = units_in[order]
    out = QwenRunner(model).vision.run(enc["pixel_values"], grid, [pruning.create("divprune", num_tokens=3)])
    start = 0
    for row, n in enumerate((grid.prod(-1) // 4).tolist()):
        assert out.units[row, : int(out.counts[row])].tolist() == plain_divprune(feats[start : start + n], 3)
        start += n


def test_llava_eval_generates_with_the_pruner():
    """End to end on the tiny LLaVA: the visual tokens the LLM gets are the budget."""
    from vlm.backbones import LlavaBackbone

    torch.manual_seed(0)
    backbone = LlavaBackbone(config=TINY_LLAVA_CONFIG)
    ids = torch.tensor([[1, 7] + [5] * 16 + [9, 10]] * 2)
    with torch.no_grad():
        gen = backbone.runner.generate(ids, torch.randn(2, 3, 32, 32), torch.ones_like(ids), max_new_tokens=2,
                                       hooks=[pruning.create("divprune", num_tokens=4)])
    assert gen.tokens.shape == (2, 2) and gen.inputs.visual_counts.tolist() == [4, 4]
