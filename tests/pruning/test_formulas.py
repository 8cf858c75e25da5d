"""Kept indices of VTC-CLS, FlowCut and CLS attention equal a plain implementation of their formulas
on explicit attention matrices, image by image, while ours runs batched through probe rows.

The suites are functions of a registered name (``check_kept_indices``, ``check_budget_in_raster_order``,
``check_registry``), so a new pruner runs through them with no edit here: the registry-derived
tests cover every registered vision pruner, and a pruner's own test passes its plain reference
(tests/test_one_file_method.py does this for a throwaway pruner)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from tests.llava.tiny import tiny_llava
from tests.pruning import plain
from tests.registries import registered_in_files, vision_pruners
from vlm import pruning
from vlm.context import Tower
from vlm.towers.llava import LlavaRunner

#: Patches of the tiny LLaVA's 48 px images of 8 px patches.
PATCHES = 36


def formula_setup() -> tuple[LlavaRunner, torch.Tensor]:
    """A tiny LLaVA runner and three images: 8 vision blocks, 36 patches; LLaVA's feature layer -2
    runs 7 blocks (FlowCut cuts after 1, 3, 5)."""
    model = tiny_llava(seed=1, image_size=48, patch_size=8, vision_layers=8)
    runner = LlavaRunner(model)
    for layer in runner.vision.model.encoder.layers:  # peaked attention: low entropy, FlowCut cuts early
        layer.self_attn.q_proj.weight.data *= 4
        layer.self_attn.k_proj.weight.data *= 4
    torch.manual_seed(3)
    return runner, torch.randn(3, 3, 48, 48)


@pytest.fixture(scope="module")
def setup():
    return formula_setup()


@torch.no_grad()
def check_kept_indices(runner: LlavaRunner, pixels: torch.Tensor, name: str, kwargs: dict, make_cut: Callable) -> None:
    """The registered pruner ``name`` (``kwargs``), run batched through the runner, keeps per image
    exactly the patches of ``plain.run_plain`` with the cut ``make_cut(n_blocks)`` (its rule on
    explicit attention matrices and values), ``num_tokens`` of them."""
    pruner = pruning.create(name, **kwargs)
    visual = runner.encode_images(pixels, [pruner])
    n_blocks = runner.vision.blocks_for(runner.feature_layer)
    for i in range(pixels.shape[0]):
        expected = plain.run_plain(runner.vision.model, pixels[i], n_blocks, make_cut(n_blocks))
        got = visual.positions[i, : int(visual.counts[i])].tolist()
        assert got == expected
        assert len(got) == pruner.num_tokens


@torch.no_grad()
def check_budget_in_raster_order(runner: LlavaRunner, pixels: torch.Tensor, name: str, kwargs: dict) -> None:
    """The registered vision pruner ``name`` keeps ``num_tokens`` distinct patches of every image,
    in raster order (unless it declares ``keeps_raster_order = False``)."""
    pruner = pruning.create(name, **kwargs)
    visual = runner.encode_images(pixels, [pruner])
    assert visual.counts.tolist() == [pruner.num_tokens] * pixels.shape[0]
    for i in range(pixels.shape[0]):
        pos = visual.positions[i, : int(visual.counts[i])]
        order = pos if pruner.keeps_raster_order else pos.sort().values  # a declared other order: distinct only
        assert bool((order[1:] > order[:-1]).all()) and bool((pos >= 0).all()) and bool((pos < PATCHES).all())


@torch.no_grad()
def check_batch_invariance(runner: LlavaRunner, pixels: torch.Tensor, name: str, kwargs: dict) -> None:
    """The registered vision pruner ``name`` keeps the same patches of an image alone as in a batch."""
    together = runner.encode_images(pixels, [pruning.create(name, **kwargs)])
    for i in range(pixels.shape[0]):
        alone = runner.encode_images(pixels[i : i + 1], [pruning.create(name, **kwargs)])
        n = int(together.counts[i])
        assert int(alone.counts[0]) == n
        assert torch.equal(alone.positions[0, :n], together.positions[i, :n]), f"{name}: image {i} depends on its batch"


def check_registry(name: str) -> None:
    """``name`` is registered: ``create`` builds a pruner that knows its name, the unknown-name error
    lists it, and it is not the reserved ``"none"``."""
    assert name in pruning.available() and name != pruning.NONE
    made = pruning.create(name)
    assert isinstance(made, pruning.Pruner) and made.name == name
    with pytest.raises(KeyError, match="Available: " + ", ".join(pruning.available())):
        pruning.create(name + "_unknown")


CASES = [
    ("vtc_cls", dict(num_tokens=9, start_layer=-4), lambda n: plain.vtc_cls_cut(n - 4, n - 1, 9)),
    ("vtc_cls", dict(num_tokens=5, start_layer=0, prune_layer=3), lambda n: plain.vtc_cls_cut(0, 3, 5)),
    ("flowcut", dict(num_tokens=6), lambda n: plain.flowcut_cut(n, 6)),
    ("flowcut", dict(num_tokens=12, ema=0.3), lambda n: plain.flowcut_cut(n, 12, ema=0.3)),
    ("cls_attention", dict(num_tokens=7), lambda n: plain.cls_attention_cut(n - 1, 7)),
]


@pytest.mark.parametrize("name,kwargs,make_cut", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kept_indices_match_plain_formulas(setup, name, kwargs, make_cut):
    check_kept_indices(*setup, name, kwargs, make_cut)
    assert kwargs["num_tokens"] < PATCHES  # something was cut


@pytest.mark.parametrize("name", vision_pruners())
def test_every_vision_pruner_keeps_its_budget_in_raster_order(setup, name):
    """Every registered vision pruner (the registry's list), with its defaults and a budget of 10."""
    check_budget_in_raster_order(*setup, name, dict(num_tokens=10))


@pytest.mark.parametrize("name", vision_pruners())
def test_every_vision_pruner_is_batch_invariant(setup, name):
    """A sample's kept patches never depend on its batch neighbours (every registered vision pruner)."""
    check_batch_invariance(*setup, name, dict(num_tokens=10))


@torch.no_grad()
def test_flowcut_prunes_progressively_and_per_sample(setup):
    """The entropy rule gives each image its own intermediate size (no batch maximum)."""
    runner, pixels = setup
    sizes = []

    class Spy(pruning.TokenPruner):
        towers = (Tower.VISION,)
        name = "spy"

        def before_block(self, ctx, state):
            n = state.x.shape[1]
            lengths = state.lengths if state.lengths is not None else torch.full((state.x.shape[0],), n)
            sizes.append(lengths.tolist())
            return state

    runner.encode_images(pixels, [pruning.create("flowcut", num_tokens=6), Spy()])
    assert sizes[0] == [37, 37, 37] and sizes[-1] == [7, 7, 7]
    assert any(len(set(s)) > 1 for s in sizes), sizes  # ragged in between
    assert all(a >= b for s0, s1 in zip(sizes, sizes[1:]) for a, b in zip(s0, s1))


def test_registry_names_and_none():
    """The registry holds exactly the names the package's files register (a method file whose
    import was dropped, or a stray registration, differs), each reachable by name; ``"none"`` is
    no pruner."""
    assert pruning.available() == registered_in_files(pruning)
    assert {"cls_attention", "flowcut", "vtc_cls"} <= set(pruning.available())  # the derivation finds the shipped ones
    for name in pruning.available():
        check_registry(name)
    assert pruning.create("none") is None
    with pytest.raises(KeyError, match="Available: " + ", ".join(pruning.available())):
        pruning.create("no_such_pruner")


@torch.no_grad()
def test_random_keeps_budget_in_raster_order(setup):
    runner, pixels = setup
    visual = runner.encode_images(pixels, [pruning.create("random", num_tokens=10, seed=4)])
    assert visual.counts.tolist() == [10, 10, 10]
    pos = visual.positions
    assert bool((pos[:, 1:] > pos[:, :-1]).all()) and bool((pos >= 0).all())
