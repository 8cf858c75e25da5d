"""Qwen2.5-VL and Qwen3-VL through our runner, no hooks: parity with transformers fed exactly what its
processor returns (``mm_token_type_ids`` included), for the vision tower (merged tokens, DeepStack),
the logits (left and right padding, padded or packed prefill) and greedy generation; batches of three
prompts, one of them with two images, four images of different sizes (Qwen2.5-VL: windows with and
without a partial edge). Also: the vision tower serves probe rows from its full-attention blocks
(checked against an explicit softmax of the block's own projections) and refuses them in windowed
blocks, and misuse fails clearly."""

from __future__ import annotations

import pytest
import torch

from tests.qwen.hooks import ProbeRecorder
from tests.qwen.tiny import EOS, PAD, encode
from vlm import pruning
from vlm.towers.qwen import QwenRunner

ATOL = 1e-5  # fp32; measured: 0 (Qwen2.5-VL padded), <= 2e-7 otherwise


@torch.no_grad()
def test_vision_tower_parity(model):
    enc = encode(model.config.model_type, "right")
    ref = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    ours = QwenRunner(model).encode_images(enc["pixel_values"], enc["image_grid_thw"])
    full = (enc["image_grid_thw"].prod(-1) // 4).tolist()
    assert ours.counts.tolist() == full and ours.full_count.tolist() == full
    for i, feats in enumerate(ref.pooler_output):
        torch.testing.assert_close(ours.features[i, : full[i]], feats, atol=ATOL, rtol=1e-5)
        assert ours.positions[i, : full[i]].tolist() == list(range(full[i]))
    if model.config.model_type == "qwen3_vl":
        assert ours.deepstack.shape[0] == len(ref.deepstack_features) == 2
        for j, per_image in enumerate(ref.deepstack_features):
            for i, feats in enumerate(per_image):
                torch.testing.assert_close(ours.deepstack[j, i, : full[i]], feats, atol=ATOL, rtol=1e-5)
    else:
        assert ours.deepstack is None


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_forward_parity(model, side, packed):
    enc = encode(model.config.model_type, side)
    ref = model(**enc).logits
    ours, inputs = QwenRunner(model, packed_prefill=packed)(
        enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], padding_side=side)
    mask = enc["attention_mask"].bool()
    assert torch.equal(inputs.attention_mask, enc["attention_mask"])
    rope, deltas = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                              attention_mask=enc["attention_mask"])
    assert torch.equal(inputs.position_ids[:, mask], rope[:, mask])
    assert inputs.next_position.tolist() == (deltas[:, 0] + mask.sum(1)).tolist()  # rope_deltas + length
    assert torch.equal(inputs.visual_mask, enc["mm_token_type_ids"].bool())
    torch.testing.assert_close(ours[mask], ref[mask], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@torch.no_grad()
def test_greedy_generation_parity(model, packed):
    enc = encode(model.config.model_type, "left")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    ours = QwenRunner(model, packed_prefill=packed).generate(
        enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], max_new_tokens=8,
        eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ours.tokens, ref[:, enc["input_ids"].shape[1] :])
    assert ours.prefill_s > 0 and ours.decode_s > 0


@torch.no_grad()
def test_baseline_needs_mm_token_type_ids(model):
    """Without ``mm_token_type_ids`` transformers cannot build the 3-D positions: Qwen2.5-VL silently
    falls back to 1-D positions (other logits), Qwen3-VL raises. Hence the baseline above passes them."""
    enc = encode(model.config.model_type, "right")
    plain = {k: v for k, v in enc.items() if k != "mm_token_type_ids"}
    if model.config.model_type == "qwen3_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**plain)
        return
    mask = enc["attention_mask"].bool()
    assert (model(**plain).logits[mask] - model(**enc).logits[mask]).abs().max() > 1e-3


@torch.no_grad()
def test_probes_come_from_full_attention_blocks(model):
    """Probe rows in a full-attention block equal the softmax of the block's own rotated q and k
    (``block.qkv``) over each image's tokens; a windowed block refuses them."""
    enc = encode(model.config.model_type, "right")
    runner = QwenRunner(model)
    windowed = [b.layer for b in runner.vision.blocks if b.windowed]
    full = [b.layer for b in runner.vision.blocks if not b.windowed]
    hook = ProbeRecorder(full[0], [0, 5])
    runner.encode_images(enc["pixel_values"], enc["image_grid_thw"], [hook])
    lengths = enc["image_grid_thw"].prod(-1)
    assert hook.probes.shape == hook.reference.shape == (4, 4, 2, int(lengths.max()))
    torch.testing.assert_close(hook.probes, hook.reference, atol=1e-6, rtol=1e-5)
    assert model.config.model_type == "qwen3_vl" or windowed == [0, 2, 3]
    if windowed:
        with pytest.raises(ValueError, match="full-attention"):
            runner.encode_images(enc["pixel_values"], enc["image_grid_thw"], [ProbeRecorder(windowed[0], [0])])


def test_misuse_fails_clearly(model):
    enc = encode(model.config.model_type, "right")
    runner = QwenRunner(model)
    with pytest.raises(ValueError, match="images"):
        runner(enc["input_ids"], enc["pixel_values"][:-48], enc["image_grid_thw"][:-1], enc["attention_mask"])
    with pytest.raises(ValueError, match="patches"):
        runner(enc["input_ids"], enc["pixel_values"][:-1], enc["image_grid_thw"], enc["attention_mask"])
    layers = model.config.text_config.num_hidden_layers
    stage = pruning.create("flowcut_llm", num_tokens=4, layer=layers - 1, two_stage=False)  # no layer after the cut
    with pytest.raises(ValueError, match="out of range"):
        runner(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], [stage])
    with pytest.raises(ValueError, match="position_policy"):
        QwenRunner(model, position_policy="raster")
