"""FlowCut's LLaVA-NeXT two-stage recipe: the ``flowcut_llm`` defaults against a plain
reimplementation of the released anyres selection (``tests/llava/official_anyres.py``), one image
at a time as the official evaluation runs.

The tiny model has 36 patches per crop and 8 vision blocks (cuts after blocks 1, 3 and 5) with
sharpened attention (query and key weights x 8), so the entropy rule prunes early and the crops'
own prune counts differ: cut by its own count, 11 of the 16 crops keep another set. A per-crop
count, newline tokens in the LLM span or the base view out of place would each change what the
test compares (per-crop kept patches, the packed features in order, the LLM's kept indices); the
last test checks that both deliberate flags do.
"""

from __future__ import annotations

import pytest
import torch

from tests.llava import official_anyres
from tests.llava.test_llava_next import tiny_llava_next
from tests.llava.tiny import pad_batch, prompt
from vlm import pruning
from vlm.towers.llava_next import LlavaNextRunner

BUDGET = 24  # T: visual tokens after the LLM cut; T // 2 = 12 patches per crop after the vision stage
SIZES = torch.tensor([[60, 130], [90, 90], [130, 60], [100, 70]])  # (H, W): 1x2, 2x2, 2x1, 2x2 grids
TEXT = [([1, 7, 8], [9, 10, 11]), ([1, 12], [13, 14, 15, 16, 17, 18]), ([1], [19, 20]), ([1, 21], [22])]


@pytest.fixture(scope="module")
def runner() -> LlavaNextRunner:
    model = tiny_llava_next(seed=1, image_size=48, vision_layers=8, text_layers=3)
    runner = LlavaNextRunner(model)
    for layer in runner.vision.model.encoder.layers:  # peaked attention: FlowCut cuts early, counts differ
        layer.self_attn.q_proj.weight.data *= 8
        layer.self_attn.k_proj.weight.data *= 8
    return runner


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(len(SIZES), 5, 3, 48, 48)


def ours(runner: LlavaNextRunner, pixels: torch.Tensor, image: int, pruner) -> dict:
    """Our run of one image: per-crop kept patches, the packed visual features the LLM receives,
    and the indices (into that packed span) the LLM cut keeps."""
    size = SIZES[image : image + 1]
    visual = runner.encode_images(pixels[image : image + 1], [pruner], image_sizes=size)
    n = int(visual.crops_per_image[0])
    before, after = TEXT[image]
    k = int(visual.counts[0])
    ids, mask = pad_batch([prompt(before, after, k)], "right")
    _, inputs = runner(ids, pixels[image : image + 1, :n], mask, [pruner], image_sizes=size)
    rows = inputs.cut.index[0][inputs.cut.attention_mask[0].bool()].tolist()
    span = range(len(before), len(before) + k)
    return dict(
        crops=[visual.crops.positions[c, : int(visual.crops.counts[c])].tolist() for c in range(n)],
        features=visual.features[0, :k],
        kept=[r - len(before) for r in rows if r in span],
        crops_per_image=n,
    )


def official(runner: LlavaNextRunner, pixels: torch.Tensor, image: int, budget: int = BUDGET) -> dict:
    size = tuple(SIZES[image].tolist())
    grid = runner.crop_grid(*size)
    n = 1 + grid[0] * grid[1]
    n_blocks = runner.vision.blocks_for(runner.feature_layer)  # blocks up to hidden_states[-2]
    inner = runner.model.model
    ref = official_anyres.select(runner.model, pixels[image, :n], size, grid, TEXT[image], budget, n_blocks)
    vm = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    _, states = official_anyres.vision_stage(vm, pixels[image, :n], n_blocks, budget // 2)
    ref["features"] = official_anyres.features(inner.multi_modal_projector, ref["crops"], states, ref["packed"])
    ref["kept_index"] = [ref["packed"].index(t) for t in ref["kept"]]
    return ref


@pytest.mark.parametrize("image", range(len(SIZES)))
@torch.no_grad()
def test_default_recipe_matches_the_released_anyres_selection(runner, pixels, image):
    ref = official(runner, pixels, image)
    got = ours(runner, pixels, image, pruning.create("flowcut_llm", num_tokens=BUDGET))
    assert got["crops_per_image"] == len(ref["crops"]) in (3, 5)
    assert got["crops"] == [sorted(c) for c in ref["crops"]]  # every crop, base view first
    assert all(len(c) == BUDGET // 2 for c in got["crops"])  # per-crop budget T // 2
    assert got["features"].shape[0] == len(ref["packed"])  # the LLM receives the same number of tokens
    torch.testing.assert_close(got["features"], ref["features"], atol=1e-5, rtol=1e-5)  # same tokens, same order
    assert got["kept"] == ref["kept_index"] and len(got["kept"]) == min(BUDGET, len(ref["packed"]))


@torch.no_grad()
def test_deliberate_flags_depart_from_the_released_selection(runner, pixels):
    """``shared_count=False`` changes most crops' kept sets; ``newlines="keep"`` adds newline tokens to
    the LLM span (outside the budget: the cut still keeps T patches)."""
    per_crop_differs, newline_tokens = 0, 0
    for image in range(len(SIZES)):
        ref = official(runner, pixels, image)
        own = ours(runner, pixels, image, pruning.create("flowcut_llm", num_tokens=BUDGET, shared_count=False))
        per_crop_differs += sum(a != sorted(b) for a, b in zip(own["crops"], ref["crops"]))
        native = ours(runner, pixels, image, pruning.create("flowcut_llm", num_tokens=BUDGET, newlines="keep"))
        assert native["crops"] == [sorted(c) for c in ref["crops"]]
        newline_tokens += native["features"].shape[0] - len(ref["packed"])
        nl = runner.model.model.image_newline
        is_nl = [bool(torch.equal(f, nl)) for f in native["features"]]
        assert sum(not is_nl[j] for j in native["kept"]) == min(BUDGET, len(ref["packed"]))
    assert per_crop_differs >= 8 and newline_tokens > 0  # 11 of the 16 crops differ on this model
