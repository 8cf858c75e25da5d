"""With no hooks, our block-by-block runners reproduce the libraries' own forwards (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import minilm_path, tiny_clip_cfg
from vlm.backbones import ClipBackbone, ViTBackbone

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg_kwargs,quick_gelu",
    [({}, False), ({}, True), ({"pool_type": "avg"}, False), ({"final_ln_after_pool": True}, False)],
    ids=["tok", "quickgelu", "avgpool", "ln_after_pool"],
)
def test_open_clip_image_and_text_parity(cfg_kwargs, quick_gelu):
    torch.manual_seed(0)
    bb = ClipBackbone("tiny", model_cfg=tiny_clip_cfg(**cfg_kwargs), quick_gelu=quick_gelu)
    if quick_gelu:
        assert type(bb.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    images = torch.randn(3, 3, 32, 32)
    tokens = bb.tokenize(["a photo of a cat.", "a dog", "x " * 100])  # the last one is truncated
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), bb.model.encode_image(images), **TOL)
        torch.testing.assert_close(bb.encode_text(tokens), bb.model.encode_text(tokens), **TOL)


def test_open_clip_text_is_causal():
    torch.manual_seed(0)
    bb = ClipBackbone("tiny", model_cfg=tiny_clip_cfg())
    a = bb.tokenize(["a photo of a cat."])
    b = a.clone()
    eot = int(a.argmax())
    b[0, eot + 1] = 123  # change a padding token after EOT: EOT's feature must not move
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(a), bb.encode_text(b), **TOL)


def test_hf_text_tower_parity():
    """The quickstart's pretrained HF text tower (all-MiniLM-L6-v2) with mean pooling."""
    cfg = tiny_clip_cfg()
    cfg["text_cfg"] = {"hf_model_name": str(minilm_path()), "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}
    torch.manual_seed(0)
    bb = ClipBackbone("tiny-hf", model_cfg=cfg)
    tokens = bb.tokenize(["a photo of the digit three.", "seven", "a handwritten number"])
    assert (tokens == 0).any(), "the test needs padded sequences"
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(tokens), bb.model.encode_text(tokens), **TOL)


TIMM_VARIANTS = {
    "cls": {},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True},
    "avg_pool": {"global_pool": "avg", "class_token": False, "fc_norm": True},
    "registers_avg_noembedcls": {"reg_tokens": 1, "no_embed_class": True, "global_pool": "avg"},
    "layerscale_qknorm": {"init_values": 0.1, "qk_norm": True},
}


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_timm_vit_parity(variant):
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 32, "num_classes": 5, **TIMM_VARIANTS[variant]})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = bb.vision.forward_features(images)
        ref = bb.model.forward_features(images)
        torch.testing.assert_close(ours.x, ref, **TOL)
        torch.testing.assert_close(bb.vision.forward_head(ours), bb.model.forward_head(ref), **TOL)


def test_backbone_is_frozen_and_stays_in_eval():
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 32})
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.model.training
