"""Pruners inside the CLIP and ViT classifiers: CLS and prompts survive, pooling stays correct on
pruned (and ragged) token states, and a sample's logits do not depend on its batch neighbours."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_clip_cfg
from vlm import prompts, pruning
from vlm.backbones import ClipBackbone, ViTBackbone
from vlm.modules.clip_classifier import CLIPClassifier
from vlm.modules.vit_classifier import ViTClassifier
from vlm.tokens import TokenType

TOL = dict(atol=1e-5, rtol=1e-5)


def sharpen(blocks):
    """Peaked attention (low entropy) so FlowCut's adaptive cuts differ between images."""
    for blk in blocks:
        blk.attn.qkv.weight.data[: 2 * blk.attn.qkv.weight.shape[1]] *= 4


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 64, "patch_size": 8, "global_pool": "avg"})
    sharpen(bb.model.blocks)
    return bb


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@torch.no_grad()
def test_last_layer_cut_pools_exactly_the_kept_tokens(vit, images):
    """Cutting after the last block keeps the unpruned tokens, so avg pooling must equal the mean of
    the unpruned final tokens at the kept patch positions."""
    pruner = pruning.create("cls_attention", num_tokens=10)
    full = vit.vision.forward_features(images)
    pruned = vit.vision.forward_features(images, [pruner])
    assert pruned.x.shape[1] == 11 and pruned.lengths is None
    assert bool((pruned.batch_types[:, 0] == int(TokenType.CLS)).all())
    kept = pruned.positions[:, 1:]
    manual = torch.stack([full.x[i, kept[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(vit.vision.pool(pruned), manual, **TOL)


@pytest.mark.parametrize("name,kw", [("flowcut", dict(num_tokens=8)), ("vtc_cls", dict(num_tokens=12, start_layer=0, prune_layer=2))])
@torch.no_grad()
def test_vit_classifier_batch_invariant_with_pruner(vit, images, name, kw):
    module = ViTClassifier(vit, num_classes=4, pruner=pruning.create(name, **kw)).eval()
    together = module(images)["logits"]
    for i in range(3):
        torch.testing.assert_close(together[i], module(images[i : i + 1])["logits"][0], **TOL)
    state = vit.vision.forward_features(images, module.hooks)
    assert state.x.shape[1] == 1 + kw["num_tokens"]


@torch.no_grad()
def test_flowcut_ragged_state_inside_vit(vit, images):
    lengths = []

    class Spy(pruning.TokenPruner):
        name = "spy"

        def after_block(self, ctx, state, attn):
            lengths.append(None if state.lengths is None else state.lengths.tolist())
            return state

    vit.vision.forward_features(images, [pruning.create("flowcut", num_tokens=8), Spy()])
    assert any(lg is not None and len(set(lg)) > 1 for lg in lengths), lengths


@torch.no_grad()
def test_no_cut_when_budget_covers_all_patches(vit, images):
    module = ViTClassifier(vit, num_classes=4, pruner=pruning.create("flowcut", num_tokens=64)).eval()
    plain = ViTClassifier(vit, num_classes=4).eval()
    plain.head.load_state_dict(module.head.state_dict())
    torch.testing.assert_close(module(images)["logits"], plain(images)["logits"], **TOL)


@torch.no_grad()
def test_clip_classifier_with_prompts_and_pruner():
    torch.manual_seed(0)
    bb = ClipBackbone("tiny", model_cfg=tiny_clip_cfg(image_size=64, layers=4))
    vpt = prompts.create("vpt", num_tokens=3)
    module = CLIPClassifier(bb, prompt_learner=vpt, classnames=["cat", "dog"], pruner=pruning.create("flowcut", num_tokens=6))
    module.eval()
    assert module.hooks == [vpt, module.pruner]
    x = torch.randn(2, 3, 64, 64)
    out = module(x)["logits"]
    assert out.shape == (2, 2)
    state = bb.vision(x, module.hooks).state
    types = state.batch_types
    assert (types == int(TokenType.PROMPT)).sum(1).tolist() == [3, 3]
    assert (types == int(TokenType.PATCH)).sum(1).tolist() == [6, 6]
    torch.testing.assert_close(out[1], module(x[1:])["logits"][0], **TOL)
