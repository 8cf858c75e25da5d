"""Kept indices of VTC-CLS, FlowCut and CLS attention equal a plain implementation of their formulas
on explicit attention matrices, image by image, while ours runs batched through probe rows."""

from __future__ import annotations

import pytest
import torch

from tests.llava.tiny import tiny_llava
from tests.pruning import plain
from vlm import pruning
from vlm.towers.llava import LlavaRunner


@pytest.fixture(scope="module")
def setup():
    # 8 vision blocks, 36 patches; LLaVA's feature layer -2 runs 7 blocks (FlowCut cuts after 1, 3, 5).
    model = tiny_llava(seed=1, image_size=48, patch_size=8, vision_layers=8)
    runner = LlavaRunner(model)
    for layer in runner.vision.model.encoder.layers:  # peaked attention: low entropy, FlowCut cuts early
        layer.self_attn.q_proj.weight.data *= 4
        layer.self_attn.k_proj.weight.data *= 4
    torch.manual_seed(3)
    return runner, torch.randn(3, 3, 48, 48)


CASES = [
    ("vtc_cls", dict(num_tokens=9, start_layer=-4), lambda n: plain.vtc_cls_cut(n - 4, n - 1, 9)),
    ("vtc_cls", dict(num_tokens=5, start_layer=0, prune_layer=3), lambda n: plain.vtc_cls_cut(0, 3, 5)),
    ("flowcut", dict(num_tokens=6), lambda n: plain.flowcut_cut(n, 6)),
    ("flowcut", dict(num_tokens=12, ema=0.3), lambda n: plain.flowcut_cut(n, 12, ema=0.3)),
    ("cls_attention", dict(num_tokens=7), lambda n: plain.cls_attention_cut(n - 1, 7)),
]


@pytest.mark.parametrize("name,kwargs,make_cut", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@torch.no_grad()
def test_kept_indices_match_plain_formulas(setup, name, kwargs, make_cut):
    runner, pixels = setup
    pruner = pruning.create(name, **kwargs)
    visual = runner.encode_images(pixels, [pruner])
    n_blocks = runner.vision.blocks_for(runner.feature_layer)
    for i in range(pixels.shape[0]):
        expected = plain.run_plain(runner.vision.model, pixels[i], n_blocks, make_cut(n_blocks))
        got = visual.positions[i, : int(visual.counts[i])].tolist()
        assert got == expected
        assert len(got) == kwargs["num_tokens"]


@torch.no_grad()
def test_flowcut_prunes_progressively_and_per_sample(setup):
    """The entropy rule gives each image its own intermediate size (no batch maximum)."""
    runner, pixels = setup
    sizes = []

    class Spy(pruning.TokenPruner):
        towers = ("vision",)
        name = "spy"

        def before_block(self, tower, layer, state):
            n = state.x.shape[1]
            lengths = state.lengths if state.lengths is not None else torch.full((state.x.shape[0],), n)
            sizes.append(lengths.tolist())
            return state

    runner.encode_images(pixels, [pruning.create("flowcut", num_tokens=6), Spy()])
    assert sizes[0] == [37, 37, 37] and sizes[-1] == [7, 7, 7]
    assert any(len(set(s)) > 1 for s in sizes), sizes  # ragged in between
    assert all(a >= b for s0, s1 in zip(sizes, sizes[1:]) for a, b in zip(s0, s1))


def test_registry_names_and_none():
    assert pruning.available() == ["cls_attention", "flowcut", "flowcut_llm", "random", "vtc_cls"]
    assert pruning.create("none") is None
    with pytest.raises(KeyError, match="Available: cls_attention, flowcut, flowcut_llm, random, vtc_cls"):
        pruning.create("fastv")


@torch.no_grad()
def test_random_keeps_budget_in_raster_order(setup):
    runner, pixels = setup
    visual = runner.encode_images(pixels, [pruning.create("random", num_tokens=10, seed=4)])
    assert visual.counts.tolist() == [10, 10, 10]
    pos = visual.positions
    assert bool((pos[:, 1:] > pos[:, :-1]).all()) and bool((pos >= 0).all())
