"""LLaVA through our runner: parity with transformers (no pruner), kept-token count and order, and
batch/padding invariance (a sample's output does not depend on its neighbours)."""

from __future__ import annotations

import pytest
import torch

from tests.llava.tiny import pad_batch, prompt
from vlm import pruning
from vlm.towers.llava import LlavaRunner

ATOL = 1e-5  # fp32 logits; tiny model, same kernels up to summation order


def valid_logits(logits, mask):
    return [logits[i][mask[i].bool()] for i in range(logits.shape[0])]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@torch.no_grad()
def test_forward_parity_with_transformers(model, batch, packed):
    seqs, pix = batch
    ids, mask = pad_batch(seqs, "right")
    ref = model(input_ids=ids, pixel_values=pix, attention_mask=mask).logits
    ours, inputs = LlavaRunner(model, packed_prefill=packed)(ids, pix, mask)
    assert torch.equal(inputs.attention_mask, mask)
    for r, o in zip(valid_logits(ref, mask), valid_logits(ours, mask)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@torch.no_grad()
def test_left_padded_forward_parity(model, batch, packed):
    """transformers' forward takes position ids from the caller for left padding (as generate does)."""
    seqs, pix = batch
    ids, mask = pad_batch(seqs, "left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=ids, pixel_values=pix, attention_mask=mask, position_ids=pos).logits
    ours, inputs = LlavaRunner(model, packed_prefill=packed)(ids, pix, mask, padding_side="left")
    assert torch.equal(inputs.attention_mask, mask)
    for r, o in zip(valid_logits(ref, mask), valid_logits(ours, mask)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@torch.no_grad()
def test_greedy_generation_parity(model, batch, packed):
    seqs, pix = batch
    ids, mask = pad_batch(seqs, "left")
    ref = model.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, do_sample=False, max_new_tokens=8)
    ours = LlavaRunner(model, packed_prefill=packed).generate(ids, pix, mask, max_new_tokens=8)
    assert torch.equal(ours.tokens, ref[:, ids.shape[1] :])
    assert ours.prefill_s > 0 and ours.decode_s > 0


@torch.no_grad()
def test_single_placeholder_equals_expanded_run(model, batch):
    seqs, pix = batch
    runner = LlavaRunner(model)
    short = [prompt([1, 7, 8], [9, 10, 11], 1)]
    long = [seqs[0]]
    a, _ = runner(*pad_batch(short, "right")[:1], pix[:1])
    b, _ = runner(*pad_batch(long, "right")[:1], pix[:1])
    torch.testing.assert_close(a, b)


PRUNERS = [None, ("vtc_cls", dict(num_tokens=6, start_layer=0)), ("flowcut", dict(num_tokens=5)), ("cls_attention", dict(num_tokens=4))]


@pytest.mark.parametrize("spec", PRUNERS, ids=lambda s: "none" if s is None else s[0])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batch_and_padding_invariance(model, batch, spec, side):
    seqs, pix = batch
    hooks = [] if spec is None else [pruning.create(spec[0], **spec[1])]
    runner = LlavaRunner(model)
    ids, mask = pad_batch(seqs, side)
    together, inputs = runner(ids, pix, mask, hooks, padding_side=side)
    budget = 16 if spec is None else spec[1]["num_tokens"]
    assert inputs.visual_counts.tolist() == [budget] * 3
    for i, seq in enumerate(seqs):
        one_ids, one_mask = pad_batch([seq], side)
        alone, _ = runner(one_ids, pix[i : i + 1], one_mask, hooks, padding_side=side)
        got = together[i][inputs.attention_mask[i].bool()]
        torch.testing.assert_close(got, alone[0], atol=ATOL, rtol=1e-5)
    ids, mask = pad_batch(seqs, "left")
    gen = runner.generate(ids, pix, mask, hooks, max_new_tokens=4)
    for i, seq in enumerate(seqs):
        one_ids, one_mask = pad_batch([seq], "left")
        alone = runner.generate(one_ids, pix[i : i + 1], one_mask, hooks, max_new_tokens=4)
        assert torch.equal(gen.tokens[i], alone.tokens[0])


@torch.no_grad()
def test_kept_tokens_count_order_and_position_policies(model, batch):
    seqs, pix = batch
    pruner = pruning.create("vtc_cls", num_tokens=6, start_layer=0)
    compact = LlavaRunner(model)
    original = LlavaRunner(model, position_policy="original")
    visual = compact.encode_images(pix, [pruner])
    assert visual.counts.tolist() == [6, 6, 6] and visual.features.shape == (3, 6, 32)
    assert bool((visual.positions[:, 1:] > visual.positions[:, :-1]).all())
    ids, mask = pad_batch(seqs, "right")
    c = compact.build_inputs(ids, visual, mask)
    o = original.build_inputs(ids, visual, mask)
    n0 = 3  # text tokens before the image in sample 0
    assert c.position_ids[0, : n0 + 6 + 3].tolist() == list(range(n0 + 6 + 3))
    assert o.position_ids[0, n0 : n0 + 6].tolist() == (n0 + visual.positions[0]).tolist()
    assert o.position_ids[0, n0 + 6 : n0 + 9].tolist() == [n0 + 16, n0 + 17, n0 + 18]
    full = compact.encode_images(pix)
    assert torch.equal(original.build_inputs(ids, full, mask).position_ids, compact.build_inputs(ids, full, mask).position_ids)


def test_mismatched_images_raise(model, batch):
    seqs, pix = batch
    with pytest.raises(ValueError, match="images"):
        ids, mask = pad_batch(seqs, "right")
        LlavaRunner(model)(ids, pix[:2], mask)
