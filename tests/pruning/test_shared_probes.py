"""Hooks that probe attention append their rows to ``spec.probe_rows`` (the rule in ``vlm.hooks``):
DAPT's CLS-attention probe and a CLS-attention pruner on one tower each get their own rows, the
same as when each runs alone.

``check_pruner_beside_probes`` is the suite for one registered vision pruner; it runs over every
one (the registry's list), with its defaults, the probes at the block of its first declared cut
(``cut_layers``), where the probed tokens are still those of a run without the pruner."""

from __future__ import annotations

import pytest
import torch
from vlm.prompts.dapt_masks import ClsAttentionProbe

from tests.helpers import tiny_clip_cfg
from tests.registries import vision_pruners
from vlm import pruning
from vlm.backbones import ClipBackbone
from vlm.context import Tower
from vlm.hooks import TowerHook

TOL = {"atol": 1e-6, "rtol": 1e-5}  # one probe row computed among several vs alone: the same up to rounding


class RowProbe(TowerHook):
    """Probes query row ``row`` (a patch) of vision block ``layer``, so its rows differ from the CLS rows."""

    towers = (Tower.VISION,)

    def __init__(self, row: int, layer: int) -> None:
        super().__init__()
        self.row, self.layer, self.weights = row, layer, None

    def attention_spec(self, ctx, state, spec):
        return self.request_probe(ctx, state, spec, torch.tensor([self.row])) if ctx.layer == self.layer else spec

    def after_block(self, ctx, state, attn):
        if ctx.layer == self.layer:
            self.weights = self.read_probe(ctx, attn)[:, :, 0]
        return state


def probe_for(clip, layer: int) -> ClsAttentionProbe:
    return ClsAttentionProbe(layer)  # resolves a negative layer from the pass (ctx.resolve_layer)


def tiny_clip_4() -> ClipBackbone:
    """4 blocks and a 6x6 grid: windows of several layers and cuts with patches to spare."""
    torch.manual_seed(0)
    return ClipBackbone("tiny", model_cfg=tiny_clip_cfg(image_size=48, layers=4))


@torch.no_grad()
def check_pruner_beside_probes(clip, name: str, kwargs: dict, order: str = "probe_first") -> None:
    """The registered pruner ``name`` (``kwargs``), run after a CLS-attention probe and a patch-row
    probe of the block of its first cut, keeps the same tokens and features as alone, and each
    probe reads its own row of that block, the same as alone."""
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    n = int(clip.vision.num_layers)
    pruner = pruning.create(name, **kwargs)
    cuts, _ = pruner.cut_layers(n)
    assert cuts, f"{name} declares no cut"
    probe_layer = min(cuts)
    alone_probe, alone_rows = probe_for(clip, probe_layer), RowProbe(7, probe_layer)
    clip.encode_image(images, [alone_probe])
    clip.encode_image(images, [alone_rows])
    alone_pruned = clip.run_vision(images, [pruner])

    probe, rows = probe_for(clip, probe_layer), RowProbe(7, probe_layer)
    pruner = pruning.create(name, **kwargs)
    hooks = [probe, rows, pruner] if order == "probe_first" else [rows, probe, pruner]
    both = clip.run_vision(images, hooks)

    # the pruner: the same kept tokens and features as alone
    assert both.state.x.shape[1] < 1 + 36
    assert torch.equal(both.state.positions, alone_pruned.state.positions)
    torch.testing.assert_close(both.pooled, alone_pruned.pooled, atol=0, rtol=0)
    # each probe: its own row of the block it asked for
    torch.testing.assert_close(probe.weights, alone_probe.weights, **TOL)
    assert torch.equal(probe.types, alone_probe.types)
    torch.testing.assert_close(rows.weights, alone_rows.weights, **TOL)
    assert not torch.allclose(rows.weights, probe.weights)  # a different row than CLS
    assert torch.allclose(probe.weights.sum(-1), torch.ones(()), atol=1e-5)  # a whole softmax row


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_4()


@pytest.mark.parametrize(
    "name, kwargs",
    [(n, {}) for n in vision_pruners()]
    + [
        ("cls_attention", {"layer": 1}),  # a cut before the last block: the probe shares the pruner's block
        ("vtc_cls", {"start_layer": 1, "prune_layer": 2}),  # a window that is not the whole pass
    ],
)
@pytest.mark.parametrize("order", ["probe_first", "row_probe_first"])
def test_probe_and_pruner_each_get_their_rows(clip, name, kwargs, order):
    check_pruner_beside_probes(clip, name, dict(num_tokens=5, **kwargs), order)
