"""The LLM-stage cuts ``fastv`` and ``dart`` on a tiny random LLaVA-NeXT (4-layer Llama, 4 query / 2
key-value heads) and a tiny Qwen2.5-VL (4-layer language model): kept rows against plain
implementations written here from the released code (on transformers' own eager attention weights,
hidden states and KV cache, per sample and without padding), exact budgets, batch/padding
invariance of the cut and of greedy generation, and cached generation against transformers' own
model split at the cut (tests/qwen/test_qwen_llm_cut.py's reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tests.llava.test_llm_cut import batch, check_batch_invariance
from tests.llava.test_llava_next import SIZES, tiny_llava_next
from tests.qwen.test_qwen_llm_cut import args, reference_cut_generate, reference_inputs, sample_rows, split_lm
from tests.qwen.tiny import encode, tiny_model
from vlm import pruning
from vlm.llm_stage import ALL_PROBE_FIELDS
from vlm.towers.llava_next import LlavaNextRunner
from vlm.towers.qwen import QwenRunner

LLAVA_BUDGET = 20  # the LLaVA-NeXT samples carry 52, 40 and 88 visual tokens (newlines: layout)
QWEN_BUDGET = 7  # the Qwen2.5-VL samples carry 15 + 4, 16 and 12
STEPS = 4
#: (name, kwargs) of each cut under test
CUTS = [("fastv", {}), ("dart", {}), ("dart", dict(pivot_image=2, pivot_text=1))]
IDS = ["fastv", "dart", "dart-2-1"]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_next(text_layers=4)


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 5, 3, 32, 32)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_5_vl", text_layers=4)


# --- plain implementations, literally from the released code ---------------------------------------
def plain_fastv(attention_row, visual: list[int], budget: int) -> set[int]:
    """FastV: the last token's attention row of layer K-1 (``[H, L]``, softmax over every key), mean
    over heads, top ``budget`` of the image rows (ties: the earlier)."""
    mean = attention_row.mean(0)
    order = sorted(visual, key=lambda r: (-float(mean[r]), r))
    return set(order[:budget])


def plain_dart(keys, normed, visual: list[int], tail: list[int], budget: int, n_img: int, n_txt: int) -> set[int]:
    """DART's ``get_retained_image_token``: key L1 norms (heads concatenated: ``keys [L, Hkv * d]``)
    pick the image and text pivots; for each pivot in turn (sequence order), the candidates least
    cosine-similar to it in the final-normed output states ``normed [L, D]`` are kept, with the
    quota that makes the budget exact (pruning/dart.py)."""
    if budget >= len(visual):
        return set(visual)
    l1 = keys.abs().sum(-1)

    def top(rows, k):
        return sorted(sorted(rows, key=lambda r: (-float(l1[r]), r))[:k])

    image_pivots = top(visual, min(n_img, budget))
    pivots = image_pivots + top(tail, min(n_txt, len(tail)))
    kept = list(image_pivots)
    pool = [r for r in visual if r not in kept]
    left = budget - len(image_pivots)
    for i, p in enumerate(pivots):
        quota = left // len(pivots) + (1 if i < left % len(pivots) else 0)
        sims = [float(F.cosine_similarity(normed[p], normed[r], dim=0)) for r in pool]
        chosen = [pool[j] for j in sorted(range(len(pool)), key=lambda j: (sims[j], j))[:quota]]
        kept += chosen
        pool = [r for r in pool if r not in chosen]
    return set(kept)


def plain_rows(name, kwargs, lm_out, layer, valid_rows, scored, marked, budget) -> list[int]:
    """The kept rows (text, layout and kept visual rows, in order) of one sample from transformers'
    outputs ``lm_out`` (attentions / hidden states / cache) on the sample alone."""
    visual = [r for r in valid_rows if scored[r]]
    if name == "fastv":
        row = lm_out.attentions[layer][0, :, -1]  # the last prompt token's row, softmax over all keys
        chosen = plain_fastv(row, visual, budget)
    else:
        keys = lm_out.past_key_values.layers[layer].keys[0]  # [Hkv, L, d], post-RoPE
        keys = keys.permute(1, 0, 2).flatten(1)  # heads concatenated, as the code's K_states
        normed = lm_out.norm(lm_out.hidden_states[layer + 1][0])
        last = max(r for r in valid_rows if marked[r])
        tail = [r for r in valid_rows if r > last and not marked[r]]
        chosen = plain_dart(keys, normed, visual, tail, budget, kwargs.get("pivot_image", 4),
                            kwargs.get("pivot_text", 4))
    return [r for r in valid_rows if not scored[r] or r in chosen]


@torch.no_grad()
def run_eager(lm, **inputs):
    """transformers' language model with eager attention: attention weights, hidden states, cache."""
    config = lm.config
    previous, config._attn_implementation = config._attn_implementation, "eager"
    try:
        out = lm(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True,
                 cache=DynamicCache(config=config))
    finally:
        config._attn_implementation = previous
    out.norm = lm.norm
    return out


# --- LLaVA-NeXT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", CUTS, ids=IDS)
@pytest.mark.parametrize("layer", [1, 2])
@torch.no_grad()
def test_llava_kept_rows_equal_plain_code(llava, pixels, name, kwargs, layer):
    runner = LlavaNextRunner(llava)
    pruner = pruning.create(name, num_tokens=LLAVA_BUDGET, layer=layer, **kwargs)
    ids, mask = batch(runner, pixels, "right", [pruner])
    _, inputs = runner(ids, pixels, mask, [pruner], image_sizes=SIZES)
    scored = inputs.visual_mask & ~inputs.layout_mask
    assert bool(inputs.layout_mask.any())  # the newlines stay: layout, outside the budget
    cut = inputs.cut
    assert cut.visual_counts.tolist() == [LLAVA_BUDGET + int(n) for n in inputs.layout_mask.sum(1)]
    for b in range(3):
        valid = inputs.attention_mask[b].bool()
        rows = valid.nonzero().flatten().tolist()
        out = run_eager(runner.lm, inputs_embeds=inputs.embeds[b : b + 1, valid],
                        position_ids=inputs.position_ids[b : b + 1, valid])
        expected = plain_rows(name, kwargs, out, layer, list(range(len(rows))), scored[b, valid].tolist(),
                              inputs.visual_mask[b, valid].tolist(), LLAVA_BUDGET)
        assert cut.index[b][cut.attention_mask[b].bool()].tolist() == [rows[r] for r in expected]


@pytest.mark.parametrize("name,kwargs", CUTS, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_llava_batch_and_padding_invariance(llava, pixels, name, kwargs, side):
    hooks = [pruning.create(name, num_tokens=LLAVA_BUDGET, **kwargs)]
    runner = LlavaNextRunner(llava, position_policy="original")
    visual = runner.encode_images(pixels, hooks, image_sizes=SIZES)
    check_batch_invariance(runner, pixels, hooks, visual, side, steps=STEPS)


# --- Qwen2.5-VL --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", CUTS, ids=IDS)
@pytest.mark.parametrize("layer,side,packed", [(1, "right", False), (0, "left", True)])
@torch.no_grad()
def test_qwen_kept_rows_and_generation_equal_plain_code(qwen, name, kwargs, layer, side, packed):
    """Kept rows against the plain code on transformers' own outputs, the exact budget, and the cut
    logits and greedy tokens against transformers' language model split at the cut on those rows."""
    enc = encode("qwen2_5_vl", side)
    runner = QwenRunner(qwen, packed_prefill=packed)
    pruner = pruning.create(name, num_tokens=QWEN_BUDGET, layer=layer, **kwargs)
    logits, inputs = runner(*args(enc), [pruner], padding_side=side)
    gen = runner.generate(*args(enc), [pruner], max_new_tokens=STEPS)
    lm = qwen.model.language_model
    parts = split_lm(lm, layer)
    refs = reference_inputs(qwen, enc)
    assert inputs.cut.visual_counts.tolist() == [min(QWEN_BUDGET, int(r["visual"].sum())) for r in refs]
    for b, sample in enumerate(refs):
        out = run_eager(lm, inputs_embeds=sample["embeds"], position_ids=sample["positions"])
        visual = sample["visual"].tolist()
        rows = plain_rows(name, kwargs, out, layer, list(range(len(visual))), visual, visual, QWEN_BUDGET)
        assert sample_rows(inputs, b) == rows
        ref_logits, ref_tokens, _ = reference_cut_generate(qwen, parts, layer, sample, rows, STEPS, "original")
        kept = inputs.cut.attention_mask[b].bool()
        torch.testing.assert_close(logits[b][kept], ref_logits, atol=1e-6, rtol=1e-6)
        assert gen.tokens[b].tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("name,kwargs", CUTS, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_qwen_a_sample_does_not_depend_on_its_batch(qwen, name, kwargs, side):
    runner = QwenRunner(qwen)
    pruner = pruning.create(name, num_tokens=QWEN_BUDGET, **kwargs)
    together, inputs = runner(*args(encode("qwen2_5_vl", side)), [pruner], padding_side=side)
    gen = runner.generate(*args(encode("qwen2_5_vl", side)), [pruner], max_new_tokens=STEPS)
    for b in range(3):
        one = encode("qwen2_5_vl", side, slice(b, b + 1))
        alone, single = runner(*args(one), [pruner], padding_side=side)
        assert torch.equal(single.cut.visual_counts, inputs.cut.visual_counts[b : b + 1])
        kept = inputs.cut.attention_mask[b].bool()
        torch.testing.assert_close(together[b][kept], alone[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(gen.tokens[b], runner.generate(*args(one), [pruner], max_new_tokens=STEPS).tokens[0])


# --- the probe fields and the budgets ---------------------------------------------------------------
@torch.no_grad()
def test_probe_lse_is_the_full_row_normaliser_and_budgets_are_exact(qwen):
    """``query_lse`` turns the probe row into the layer's own attention weights (they equal
    transformers' eager weights at the visual keys, and are not the visual-only softmax); every
    budget from 1 to above the count keeps exactly ``min(num_tokens, count)``."""
    enc = encode("qwen2_5_vl", "left")
    runner = QwenRunner(qwen)
    probes = []
    pruner = pruning.create("fastv", num_tokens=QWEN_BUDGET, layer=1)
    pruner.probe_fields = ALL_PROBE_FIELDS  # the probe also feeds DART below
    keep = pruner.keep
    pruner.keep = lambda probe: probes.append(probe) or keep(probe)
    runner(*args(enc), [pruner], padding_side="left")
    (probe,) = probes
    lm = qwen.model.language_model
    for b, sample in enumerate(reference_inputs(qwen, enc)):
        out = run_eager(lm, inputs_embeds=sample["embeds"], position_ids=sample["positions"])
        vis = sample["visual"].nonzero().flatten()
        n = int(probe.counts[b])
        q, k = probe.query[b], probe.keys[b, :, :n].repeat_interleave(2, 0)
        weights = torch.exp(torch.einsum("hd,hnd->hn", q, k) * probe.scale - probe.query_lse[b][:, None])
        torch.testing.assert_close(weights, out.attentions[1][0, :, -1, vis], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(weights.mean(0), weights.softmax(-1).mean(0))
        assert int(probe.text_counts[b]) == len(sample["visual"]) - 1 - int(vis[-1])
    counts = [int(c) for c in probe.counts]
    for name, kwargs in CUTS:
        for budget in (1, 2, 5, 12, 15, 100):
            kept = pruning.create(name, num_tokens=budget, **kwargs).keep(probe)
            assert kept.sum(1).tolist() == [min(budget, c) for c in counts]
            assert not bool((kept & ~probe.valid).any())


def test_registry_and_errors():
    assert type(pruning.create("fastv")).__name__ == "FastV"
    assert pruning.create("dart").layer == 1 and pruning.create("fastv").layer == 1
    with pytest.raises(ValueError, match="pivot"):
        pruning.create("dart", pivot_image=0, pivot_text=0)
