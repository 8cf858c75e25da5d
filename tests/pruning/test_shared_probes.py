"""Hooks that probe attention append their rows to ``spec.probe_rows`` (the rule in ``vlm.hooks``):
DAPT's CLS-attention probe and a CLS-attention pruner on one tower each get their own rows, the
same as when each runs alone."""

from __future__ import annotations

import pytest
import torch
from vlm.prompts.dapt_masks import ClsAttentionProbe

from tests.helpers import tiny_clip_cfg
from vlm import pruning
from vlm.hooks import TowerHook

TOL = {"atol": 1e-6, "rtol": 1e-5}  # one probe row computed among several vs alone: the same up to rounding


class RowProbe(TowerHook):
    """Probes query row ``row`` (a patch) of vision block ``layer``, so its rows differ from the CLS rows."""

    towers = ("vision",)

    def __init__(self, row: int, layer: int) -> None:
        super().__init__()
        self.row, self.layer, self.weights = row, layer, None

    def attention_spec(self, tower, layer, state, spec):
        return self.request_probe(state, spec, torch.tensor([self.row])) if layer == self.layer else spec

    def after_block(self, tower, layer, state, attn):
        if layer == self.layer:
            self.weights = self.read_probe(state, attn)[:, :, 0]
        return state


@pytest.fixture(scope="module")
def clip():
    from vlm.backbones import ClipBackbone

    torch.manual_seed(0)
    # 4 blocks and a 6x6 grid: windows of several layers and cuts with patches to spare
    return ClipBackbone("tiny", model_cfg=tiny_clip_cfg(image_size=48, layers=4))


def probe_for(clip, layer: int) -> ClsAttentionProbe:
    probe = ClsAttentionProbe(layer)
    probe._num_layers = int(clip.vision.num_layers)  # what ClsAttentionProbe.run sets
    return probe


@pytest.mark.parametrize(
    "name, kwargs, probe_layer",
    [
        ("cls_attention", {"layer": -1}, -1),  # both probe the same block
        ("vtc_cls", {"start_layer": 0, "prune_layer": -1}, -1),  # the pruner probes every block
        ("flowcut", {}, 0),  # the pruner probes every block up to its last cut
    ],
)
@pytest.mark.parametrize("order", ["probe_first", "row_probe_first"])
@torch.no_grad()
def test_probe_and_pruner_each_get_their_rows(clip, name, kwargs, probe_layer, order):
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    n = int(clip.vision.num_layers)
    alone_probe, alone_rows = probe_for(clip, probe_layer), RowProbe(7, probe_layer % n)
    clip.encode_image(images, [alone_probe])
    clip.encode_image(images, [alone_rows])
    alone_pruned = clip.run_vision(images, [pruning.create(name, num_tokens=5, **kwargs)])

    probe, rows = probe_for(clip, probe_layer), RowProbe(7, probe_layer % n)
    pruner = pruning.create(name, num_tokens=5, **kwargs)
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
