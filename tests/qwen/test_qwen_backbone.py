"""The Qwen backbones: built from a config dict (random weights) or loaded from a local directory
(the same code path as a hub id), with the processor; the runner's logits equal transformers'
forward of the loaded model; the budget counts merged tokens per image from the processor's pixel
limit."""

from __future__ import annotations

import pytest
import torch

from tests.qwen.tiny import MODELS, PROMPTS, SHAPES, images, tiny_processor
from vlm import pruning
from vlm.backbones import Qwen2_5VLBackbone, Qwen3VLBackbone
from vlm.runtime.reliability import TokenBudgetError
from vlm.towers.qwen import QwenRunner

BACKBONES = {"qwen2_5_vl": Qwen2_5VLBackbone, "qwen3_vl": Qwen3VLBackbone}


def test_backbone_from_config(kind):
    config, patch = MODELS[kind]
    backbone = BACKBONES[kind](config=config)
    assert isinstance(backbone.runner, QwenRunner) and backbone.runner.position_policy == "original"
    assert backbone.patches_per_image is None  # no processor: the pixel limit is unknown
    assert backbone.identity() == {"family": kind, "model": "random", "dtype": "float32"}
    assert not any(p.requires_grad for p in backbone.model.parameters())
    limit = 16 * 32 * 32
    assert BACKBONES[kind](config=config, max_pixels=limit).patches_per_image == limit // (2 * patch) ** 2


@torch.no_grad()
def test_backbone_from_local_directory(model, kind, tmp_path):
    model.save_pretrained(tmp_path)
    tiny_processor(kind).save_pretrained(tmp_path)
    backbone = BACKBONES[kind](model=str(tmp_path), packed_prefill=True)
    assert backbone.model_name == str(tmp_path) and backbone.patches_per_image == 64
    enc = backbone.encode(PROMPTS, images(kind, SHAPES))
    assert set(enc) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    ref = backbone.model(**enc).logits
    ours, _ = backbone.runner(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"],
                                   padding_side="left")
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone.model(**enc).logits, model(**enc).logits)  # the same weights
    backbone.check_budget(pruning.create("cls_attention", num_tokens=64))
    with pytest.raises(TokenBudgetError, match="64"):
        backbone.check_budget(pruning.create("cls_attention", num_tokens=65))
