"""Batches with ragged kept counts (issue 25, item 4), on both tiny models: images of different sizes
keep different numbers of merged tokens (a whole-unit cut through the vision pass, after the last
block or after block 0, so that Qwen2.5-VL's later windowed and full-attention blocks run on the
kept tokens only); the LLM runs them padded (left or right) or packed (one varlen row). A sample's
logits and greedy tokens do not depend on its neighbours in the batch."""

from __future__ import annotations

import pytest
import torch

from tests.qwen.hooks import KeepUnits
from tests.qwen.tiny import encode, image_rows
from vlm.towers.qwen import QwenRunner

ATOL = 1e-5
KEEP = [[0, 3, 4, 7, 11, 14], [2], [1, 2, 5, 8, 9, 10, 15], [0, 5, 6, 11]]


def alone(kind: str, side: str, sample: int):
    """The processor's batch of sample ``sample`` alone, and its images' keep sets."""
    rows = slice(sample, sample + 1)
    return encode(kind, side, rows), [KEEP[j] for j in image_rows(rows)]


def args(enc):
    return enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"]


@pytest.mark.parametrize("layer", [-1, 0], ids=["cut_last", "cut_first"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_logits_do_not_depend_on_the_batch(model, side, layer):
    """Each sample alone (padded prefill) against the batch, padded and packed."""
    kind = model.config.model_type
    enc = encode(kind, side)
    singles = []
    for b in range(3):
        one, keep = alone(kind, side, b)
        singles.append(QwenRunner(model)(*args(one), [KeepUnits(keep, layer=layer)], padding_side=side)[0][0])
    for packed in (False, True):
        together, inputs = QwenRunner(model, packed_prefill=packed)(*args(enc), [KeepUnits(KEEP, layer=layer)],
                                                                   padding_side=side)
        assert inputs.visual_counts.tolist() == [7, 7, 4]
        for b in range(3):
            got = together[b][inputs.attention_mask[b].bool()]
            torch.testing.assert_close(got, singles[b], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@torch.no_grad()
def test_generation_does_not_depend_on_the_batch(model, packed):
    kind = model.config.model_type
    runner = QwenRunner(model, packed_prefill=packed)
    gen = runner.generate(*args(encode(kind, "left")), [KeepUnits(KEEP)], max_new_tokens=6)
    for b in range(3):
        one, keep = alone(kind, "left", b)
        single = runner.generate(*args(one), [KeepUnits(keep)], max_new_tokens=6)
        assert torch.equal(gen.tokens[b], single.tokens[0])


@torch.no_grad()
def test_packed_equals_padded_with_ragged_counts(model):
    enc = encode(model.config.model_type, "right")
    hooks = [KeepUnits(KEEP, layer=0)]
    padded, inputs = QwenRunner(model)(*args(enc), hooks)
    packed, _ = QwenRunner(model, packed_prefill=True)(*args(enc), hooks)
    mask = inputs.attention_mask.bool()
    torch.testing.assert_close(packed[mask], padded[mask], atol=ATOL, rtol=1e-5)
    assert not packed[~mask].any()  # zeros on padding: nothing computed there
