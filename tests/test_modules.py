"""LightningModule behaviour: learned-only state, frozen text caching, base/new metrics."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_clip_cfg
from vlm.backbones import ClipBackbone, ViTBackbone
from vlm.modules import CheckpointMismatchError, CLIPClassifier, ViTClassifier
from vlm.metrics import harmonic_mean
from vlm.prompts import create


def tiny_backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone("tiny", model_cfg=tiny_clip_cfg())


def test_state_dict_holds_only_trainable_tensors_and_loading_checks_them():
    m = CLIPClassifier(tiny_backbone(), create("coop", n_ctx=3), classnames=["a", "b"])
    sd = m.state_dict()
    assert list(sd) == ["prompt_learner.ctx"]
    with pytest.raises(CheckpointMismatchError, match="missing learned tensors"):
        m.load_state_dict({})
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        m.load_state_dict({**sd, "prompt_learner.other": torch.zeros(1)})
    new = CLIPClassifier(tiny_backbone(), create("coop", n_ctx=3), classnames=["a", "b"])
    new.load_state_dict(sd)
    torch.testing.assert_close(new.prompt_learner.ctx, m.prompt_learner.ctx)


def test_frozen_text_features_are_cached_and_learned_ones_are_not():
    zs = CLIPClassifier(tiny_backbone(), classnames=["cat", "dog"])
    calls = []
    original = zs.backbone.encode_text
    zs.backbone.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)  # instance attr, test only
    images = torch.randn(2, 3, 32, 32)
    zs(images)
    zs(images)
    assert len(calls) == 1
    coop = CLIPClassifier(tiny_backbone(), create("coop", n_ctx=2), classnames=["cat", "dog"])
    out1 = coop(images)["text_features"]
    assert out1.requires_grad


def test_zero_shot_logits_equal_open_clip():
    bb = tiny_backbone()
    m = CLIPClassifier(bb, classnames=["cat", "dog", "owl"], template="a photo of a {}.")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = m(images)["logits"]
        img = bb.model.encode_image(images, normalize=True)
        txt = bb.model.encode_text(bb.tokenize([f"a photo of a {c}." for c in ["cat", "dog", "owl"]]), normalize=True)
        torch.testing.assert_close(ours, bb.model.logit_scale.exp() * img @ txt.T, atol=1e-4, rtol=1e-5)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_vit_classifier_rejects_labels_beyond_its_head():
    m = ViTClassifier(ViTBackbone("test_vit", model_kwargs={"img_size": 32}), num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        m._check_labels(torch.tensor([0, 5]))
    assert set(m.state_dict()) == {"head.weight", "head.bias"}
