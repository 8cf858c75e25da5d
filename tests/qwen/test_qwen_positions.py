"""Exact positions after pruning (issue 25, item 3), on both tiny models.

A test hook (``KeepUnits``) cuts whole merge units through the vision pass (``TokenPruner.keep_top``),
a different number per image. The reference is transformers alone: its merged image features
(``get_image_features``) gathered at the kept units, its 3-D positions (``get_rope_index`` on the
unpruned prompt) gathered at the kept tokens, its language model run step by step on those
embeddings with the positions passed explicitly, decoding at the unpruned ``rope_deltas``
(``max position + 1``, then one more per token); for Qwen3-VL its DeepStack features gathered at the
same units, with ``visual_pos_masks`` at the kept visual tokens. The ``compact`` switch renumbers the
kept sequence 0..L'-1 and decodes from L'.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.qwen.hooks import KeepUnits
from tests.qwen.tiny import encode
from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.pruning.base import TokenPruner
from vlm.towers.llava import image_runs
from vlm.towers.qwen import QwenRunner

ATOL = 1e-5
#: kept units per image (of 15, 4, 16 and 12): ragged across images and samples
KEEP = [[0, 3, 4, 7, 11, 14], [2], [1, 2, 5, 8, 9, 10, 15], [0, 5, 6, 11]]
STEPS = 6


def kept_reference(model, enc, keep, policy="original"):
    """Per sample: the kept embeddings ``[1, L', D]``, positions ``[3, 1, L']``, the first decoding
    position, and (Qwen3-VL) the visual mask and DeepStack features, from transformers' own parts."""
    inner = model.model
    feats = inner.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    deepstack = getattr(feats, "deepstack_features", None)
    rope, _ = inner.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                   attention_mask=enc["attention_mask"])
    out, image = [], 0
    for b in range(enc["input_ids"].shape[0]):
        valid = enc["attention_mask"][b].bool()
        ids = enc["input_ids"][b][valid]
        embeds = inner.get_input_embeddings()(ids).clone()
        positions = rope[:, b][:, valid]
        cols = torch.ones(len(ids), dtype=torch.bool)
        visual = torch.zeros(len(ids), dtype=torch.bool)
        stacks = [torch.zeros(len(ids), embeds.shape[-1]) for _ in (deepstack or [])]
        for start, end in image_runs(ids, model.config.image_token_id):
            embeds[start:end] = feats.pooler_output[image]
            for j, per_image in enumerate(deepstack or []):
                stacks[j][start:end] = per_image[image]
            cols[start:end] = False
            cols[[start + u for u in keep[image]]] = True
            visual[start:end] = True
            image += 1
        next_position = int(positions.max()) + 1
        positions = positions[:, cols]
        if policy == "compact":
            positions = torch.arange(int(cols.sum())).expand(3, -1)
            next_position = int(cols.sum())
        extra = {}
        if deepstack is not None:
            mask = visual[cols][None]
            extra = dict(visual_pos_masks=mask, deepstack_visual_embeds=[s[cols][visual[cols]] for s in stacks])
        out.append((embeds[cols][None], positions[:, None], next_position, extra))
    return out


@torch.no_grad()
def reference_generate(model, sample, steps):
    """Greedy tokens and the prefill's last logits of transformers' language model, step by step,
    with explicit 3-D positions."""
    embeds, positions, nxt_pos, extra = sample
    lm, head = model.model.language_model, model.lm_head
    cache = DynamicCache(config=lm.config)
    h = lm(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, **extra).last_hidden_state
    first = head(h[:, -1])
    tokens = [first.argmax(-1)]
    for s in range(steps - 1):
        x = lm.get_input_embeddings()(tokens[-1][:, None])
        pos = torch.full((3, 1, 1), nxt_pos + s)
        h = lm(inputs_embeds=x, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        tokens.append(head(h[:, -1]).argmax(-1))
    return torch.cat(tokens), first[0]


@pytest.mark.parametrize("policy", ["original", "compact"])
@torch.no_grad()
def test_pruned_generate_equals_explicit_reference(model, policy):
    enc = encode(model.config.model_type, "left")
    runner = QwenRunner(model, position_policy=policy)
    hook = KeepUnits(KEEP)
    gen = runner.generate(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], [hook],
                          max_new_tokens=STEPS)
    assert gen.inputs.visual_counts.tolist() == [6 + 1, 7, 4]
    logits, inputs = runner(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], [hook],
                            padding_side="left")
    for b, sample in enumerate(kept_reference(model, enc, KEEP, policy)):
        tokens, last = reference_generate(model, sample, STEPS)
        assert gen.tokens[b].tolist() == tokens.tolist()
        torch.testing.assert_close(logits[b, -1], last, atol=ATOL, rtol=1e-5)
        n = sample[0].shape[1]
        assert torch.equal(inputs.position_ids[:, b, -n:], sample[1][:, 0])
        assert int(inputs.next_position[b]) == sample[2]


@torch.no_grad()
def test_original_positions_keep_the_unpruned_grid(model):
    """Original: the kept tokens' (t, h, w) are their unpruned ones and the text after an image
    resumes where it would without pruning; compact: 0..L'-1. The two give different logits."""
    enc = encode(model.config.model_type, "right")
    args = (enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], [KeepUnits(KEEP)])
    orig_logits, orig = QwenRunner(model)(*args)
    comp_logits, comp = QwenRunner(model, position_policy="compact")(*args)
    n0 = 2 + 1  # sample 0: "w1 w2 <|vision_start|>", then image 0 (3 x 5 merged tokens)
    kept = torch.tensor(KEEP[0])
    expected = [[n0] * 6, (n0 + kept // 5).tolist(), (n0 + kept % 5).tolist()]  # (t, h, w) on the 3 x 5 grid
    assert orig.position_ids[:, 0, n0 : n0 + 6].tolist() == expected
    assert orig.position_ids[:, 0, n0 + 6].tolist() == [n0 + 5] * 3  # <|vision_end|> after max(3, 5)
    length = int(comp.attention_mask[0].sum())
    assert comp.position_ids[:, 0, :length].tolist() == [list(range(length))] * 3
    assert comp.next_position[0] == length
    # original: w1 w2 <vs> = 0..2, image 0 spans max(3, 5) = 5, <ve> w3 <vs> = 8..10, image 1 spans 2,
    # <ve> w4 w5 = 13..15
    assert orig.next_position[0] == 16 and orig.position_ids[:, 0, length - 1].tolist() == [15] * 3
    assert (orig_logits - comp_logits).abs().max() > 1e-3


@torch.no_grad()
def test_deepstack_follows_the_kept_set():
    """Qwen3-VL: the DeepStack features reaching the LLM are transformers' at exactly the kept units,
    at the kept visual tokens; a cut before a DeepStack tap still yields features for every kept token."""
    from tests.qwen.tiny import tiny_model

    model = tiny_model("qwen3_vl")
    enc = encode("qwen3_vl", "right")
    inner = model.model
    ref = inner.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).deepstack_features
    runner = QwenRunner(model)
    inputs = runner.prepare(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"],
                            [KeepUnits(KEEP)])
    expected = [torch.cat([per_image[i][KEEP[i]] for i in range(4)]) for per_image in ref]
    visual = inputs.visual_mask & inputs.attention_mask.bool()
    assert int(visual.sum()) == sum(len(k) for k in KEEP)
    for j in range(2):
        torch.testing.assert_close(inputs.deepstack[j][visual], expected[j], atol=ATOL, rtol=1e-5)
        assert not inputs.deepstack[j][~visual].any()
    early = runner.encode_images(enc["pixel_values"], enc["image_grid_thw"], [KeepUnits(KEEP, layer=1)])
    assert early.counts.tolist() == [len(k) for k in KEEP]
    # tap 0 (after block 0) comes before the cut: transformers' features at the kept units
    torch.testing.assert_close(early.deepstack[0, 0, :6], ref[0][0][KEEP[0]], atol=ATOL, rtol=1e-5)
    assert early.deepstack[1, 0, :6].abs().sum() > 0 and not early.deepstack[:, 1, 1:].any()


def test_patch_level_cut_is_refused(model):
    """One LLM token is one 2x2 merge unit: a hook that cuts single patches (``keep_top`` without the
    pass's ``token_group``) fails with a message that says how to cut; the registered pruners cut
    whole units (``tests/qwen/test_qwen_pruners.py``)."""

    class SinglePatches(TowerHook):
        towers = (Tower.VISION,)

        def after_block(self, ctx, state, attn):
            if ctx.layer != ctx.num_layers - 1:
                return state
            scores = torch.arange(state.x.shape[1], dtype=torch.float32).expand(state.x.shape[0], -1)
            return TokenPruner.keep_top(state, scores, 10)[0]  # group=1: splits units

    enc = encode(model.config.model_type, "right")
    with pytest.raises(ValueError, match="merge unit"):
        QwenRunner(model).encode_images(enc["pixel_values"], enc["image_grid_thw"], [SinglePatches()])
