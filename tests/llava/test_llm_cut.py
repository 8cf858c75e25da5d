"""FlowCut's LLM-stage cut (``flowcut_llm``) on a tiny random LLaVA-NeXT with a 4-layer Llama (4
query / 2 key-value heads): kept indices against a plain implementation on explicit attention
matrices, keep-all parity with the unpruned run, count/order/positions of the kept tokens,
batch/padding invariance, cached generation against an uncached recompute, the two-stage config,
and errors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.llava.test_llava_next import SIZES, TEXT, prompts, tiny_llava_next
from tests.llava.tiny import IMAGE_TOKEN, pad_batch
from vlm import pruning
from vlm.context import Tower
from vlm.pruning.flowcut_llm import FlowCutLlm
from vlm.runtime.cli import parse_configs
from vlm.towers.llava_next import LlavaNextRunner

ATOL = 1e-5
BUDGET = 20  # visual tokens per sample after the cut; the samples carry 52, 40 and 88


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next(text_layers=4)


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 5, 3, 32, 32)


def cut_pruner(num_tokens: int = BUDGET, **kwargs):
    return pruning.create("flowcut_llm", num_tokens=num_tokens, **kwargs)


def batch(runner, pixels, side, hooks=()):
    counts = runner.encode_images(pixels, list(hooks), image_sizes=SIZES).counts
    return pad_batch(prompts(counts), side)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def plain_kept_rows(lm, hidden, positions, rows, visual, probe, layer, budget) -> list[int]:
    """FlowCut's LLM score for one sample, literally: every query/key/value of layer ``layer`` from
    its input ``hidden [L, D]`` (key/value heads repeated for every query head), the explicit
    attention matrix softmax(q k^T / sqrt(d)) and the value-value matrix, their probe rows over
    the visual columns. Returns the kept sequence rows (text rows and the kept visual rows)."""
    block = lm.layers[layer]
    at = block.self_attn
    d = at.head_dim
    x = block.input_layernorm(hidden)
    q = at.q_proj(x).view(len(x), -1, d)
    k = at.k_proj(x).view(len(x), -1, d)
    v = at.v_proj(x).view(len(x), -1, d)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    cos, sin = (t[0, :, None] for t in lm.rotary_emb(x[None], positions[None]))
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    attn = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    sim = torch.einsum("qhd,khd->hqk", v, v) / math.sqrt(d)
    vis = [r for r in rows if visual[r]]
    relation = attn[:, probe, vis].softmax(-1).mean(0)
    semantic = sim[:, probe, vis].softmax(-1).mean(0)
    density = v[vis].mean(1).abs().sum(-1)
    score = ((relation / relation.sum() + semantic / semantic.sum()) * density).tolist()
    best = sorted(range(len(vis)), key=lambda j: (-score[j], j))[:budget]
    kept_vis = {vis[j] for j in best}
    return [r for r in rows if not visual[r] or r in kept_vis]


@pytest.mark.parametrize("layer,newlines", [(1, "drop"), (2, "drop"), (1, "keep")])
@torch.no_grad()
def test_kept_rows_match_plain_formula(model, pixels, layer, newlines):
    """``newlines="keep"``: the image_newline rows are kept like text, outside the scored span."""
    runner = LlavaNextRunner(model)
    pruner = cut_pruner(layer=layer, crop_tokens=8, newlines=newlines)
    ids, mask = batch(runner, pixels, "right", [pruner])
    logits, inputs = runner(ids, pixels, mask, [pruner], image_sizes=SIZES)
    assert (inputs.layout_mask is not None) == (newlines == "keep")
    scored = inputs.visual_mask if inputs.layout_mask is None else inputs.visual_mask & ~inputs.layout_mask
    if newlines == "keep":
        assert bool(inputs.layout_mask.any())
    lm = runner.lm
    hidden = lm(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                output_hidden_states=True).hidden_states[layer]
    for b in range(3):
        rows = inputs.attention_mask[b].nonzero().flatten().tolist()
        expected = plain_kept_rows(lm, hidden[b], inputs.position_ids[b], rows, scored[b].tolist(),
                                   int(inputs.probe_index[b]), layer, BUDGET)
        cut = inputs.cut
        assert cut.index[b][cut.attention_mask[b].bool()].tolist() == expected
    assert logits.shape[1] == inputs.cut.index.shape[1]


@pytest.mark.parametrize("policy", ["compact", "original"])
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_budget_above_visual_count_keeps_all_and_equals_unpruned(model, pixels, side, policy):
    runner = LlavaNextRunner(model, position_policy=policy)
    hooks = [pruning.create("cls_attention", num_tokens=7)]  # a vision stage, so positions have gaps under "original"
    ids, mask = batch(runner, pixels, side, hooks)
    ref, ref_inputs = runner(ids, pixels, mask, hooks, padding_side=side, image_sizes=SIZES)
    cut_all = cut_pruner(num_tokens=1000, two_stage=False, newlines="keep")  # the layout of the run without a cut
    ours, inputs = runner(ids, pixels, mask, hooks + [cut_all], padding_side=side, image_sizes=SIZES)
    cut = inputs.cut
    assert torch.equal(cut.visual_counts, ref_inputs.visual_counts)
    assert torch.equal(cut.attention_mask, ref_inputs.attention_mask)
    assert torch.equal(cut.position_ids, ref_inputs.position_ids)
    valid = ref_inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("policy", ["compact", "original"])
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_cut_count_order_and_positions(model, pixels, side, policy):
    runner = LlavaNextRunner(model, position_policy=policy)
    ids, mask = batch(runner, pixels, side)
    pruner = cut_pruner(two_stage=False)  # the LLM stage alone, on the packing without newlines
    ids, mask = batch(runner, pixels, side, [pruner])
    _, inputs = runner(ids, pixels, mask, [pruner], padding_side=side, image_sizes=SIZES)
    cut = inputs.cut
    assert inputs.visual_counts.tolist() == [16 + 4 * 8, 16 + 8 * 2, 16 + 8 * 8]  # base view + unpadded grid
    assert cut.visual_counts.tolist() == [BUDGET] * 3 and cut.layer == 1
    for b in range(3):
        kept = cut.attention_mask[b].bool()
        rows = cut.index[b][kept]
        assert bool((cut.index[b][~kept] == -1).all())
        assert bool((rows[1:] > rows[:-1]).all())  # original order
        text = inputs.attention_mask[b].bool() & ~inputs.visual_mask[b]
        assert set(text.nonzero().flatten().tolist()) <= set(rows.tolist())  # every text token survives
        assert len(rows) == int(text.sum()) + BUDGET
        n = len(rows)
        assert kept.tolist() == ([True] * n + [False] * (kept.numel() - n) if side == "right" else
                                 [False] * (kept.numel() - n) + [True] * n)
        pos = cut.position_ids[b][kept]
        expected = torch.arange(n) if policy == "compact" else inputs.position_ids[b][rows]
        assert torch.equal(pos, expected)
        assert bool((cut.position_ids[b][~kept] == 1).all())


@pytest.mark.parametrize("two_stage", [False, True], ids=["llm_only", "two_stage"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batch_and_padding_invariance(model, pixels, side, two_stage):
    """Each sample alone equals the sample in a padded batch (other visual counts, other lengths)."""
    hooks = [cut_pruner(crop_tokens=6) if two_stage else cut_pruner(two_stage=False)]
    runner = LlavaNextRunner(model)
    visual = runner.encode_images(pixels, hooks, image_sizes=SIZES)
    assert visual.crops.counts.tolist() == ([6] * 11 if two_stage else [16] * 11)
    check_batch_invariance(runner, pixels, hooks, visual, side, steps=4, atol=ATOL)


@torch.no_grad()
def check_batch_invariance(runner, pixels, hooks, visual, side: str, steps: int, atol: float = 1e-5) -> None:
    """Each sample of ``pixels`` (LLaVA-NeXT crops, ``SIZES``) alone equals the sample in a batch padded
    on ``side``: the same kept visual counts, the same logits over its tokens after the cut, and the
    same ``steps`` greedy tokens (left padding). For any LLM-stage pruner in ``hooks``."""
    seqs = prompts(visual.counts)
    ids, mask = pad_batch(seqs, side)
    together, inputs = runner(ids, pixels, mask, hooks, padding_side=side, image_sizes=SIZES)
    left_ids, left_mask = pad_batch(seqs, "left")
    gen = runner.generate(left_ids, pixels, left_mask, hooks, max_new_tokens=steps, image_sizes=SIZES)
    for i, seq in enumerate(seqs):
        n = int(visual.crops_per_image[i])
        one_ids, one_mask = pad_batch([seq], side)
        alone, one = runner(one_ids, pixels[i : i + 1, :n], one_mask, hooks, padding_side=side,
                            image_sizes=SIZES[i : i + 1])
        assert torch.equal(one.cut.visual_counts, inputs.cut.visual_counts[i : i + 1])
        torch.testing.assert_close(together[i][inputs.cut.attention_mask[i].bool()], alone[0], atol=atol, rtol=1e-5)
        one_ids, one_mask = pad_batch([seq], "left")
        single = runner.generate(one_ids, pixels[i : i + 1, :n], one_mask, hooks, max_new_tokens=steps,
                                 image_sizes=SIZES[i : i + 1])
        assert torch.equal(gen.tokens[i], single.tokens[0])


@pytest.mark.parametrize("policy", ["compact", "original"])
@torch.no_grad()
def test_cached_generation_equals_uncached_recompute(model, pixels, policy):
    """Greedy tokens with the split KV cache (layers <= cut: full length, > cut: cut) equal a
    recompute without cache: the whole forward, cut included, on the growing sequence (the probe
    stays the last prompt token), argmax of the last row at each step."""
    runner = LlavaNextRunner(model, position_policy=policy)
    hooks = [cut_pruner(crop_tokens=8)]
    ids, mask = batch(runner, pixels, "left", hooks)
    steps = 6
    gen = runner.generate(ids, pixels, mask, hooks, max_new_tokens=steps, image_sizes=SIZES)
    inputs = runner.prepare(ids, pixels, mask, hooks, "left", SIZES)
    last = inputs.position_ids[:, -1:]
    tokens = []
    for _ in range(steps):
        logits, _ = runner.language_model(inputs, hooks, "left")
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
        last = last + 1
        ones = torch.ones_like(nxt)[:, None]
        inputs = replace(
            inputs,
            embeds=torch.cat([inputs.embeds, runner.embed_tokens(nxt[:, None])], 1),
            attention_mask=torch.cat([inputs.attention_mask, ones], 1),
            position_ids=torch.cat([inputs.position_ids, last], 1),
            visual_mask=torch.cat([inputs.visual_mask, torch.zeros_like(ones, dtype=torch.bool)], 1),
        )
    assert torch.equal(gen.tokens, torch.stack(tokens, 1))
    cut = gen.inputs.cut
    assert cut.groups[0].layers == range(0, 2) and cut.groups[1].layers == range(2, 4)


@torch.no_grad()
def test_cache_lengths_differ_per_layer_group(model, pixels):
    from transformers import DynamicCache

    runner = LlavaNextRunner(model)
    ids, mask = batch(runner, pixels, "left")
    inputs = runner.prepare(ids, pixels, mask, None, "left", SIZES)
    cache = DynamicCache(config=runner.lm.config)
    _, cut = runner.decoder([cut_pruner()]).prefill(inputs, "left", cache)
    full, short = inputs.embeds.shape[1], cut.index.shape[1]
    assert short < full
    assert [cache.get_seq_length(i) for i in range(4)] == [full, full, short, short]


def test_two_stage_vision_budget_and_registry():
    """Defaults are the released anyres recipe: vision stage at T // 2 per crop with one prune count
    per image, newlines dropped; ``two_stage=False`` runs the LLM stage alone."""
    pruner = pruning.create("flowcut_llm", num_tokens=320)
    assert pruner.towers == (Tower.LLM,) and pruner.layer == 1
    assert pruner.vision_stage.name == "flowcut" and pruner.vision_stage.num_tokens == 160
    assert pruner.vision_stage.shared_count and pruner.newlines == "drop" and not pruner.anyres_newlines
    assert pruning.create("flowcut_llm", num_tokens=320, crop_tokens=100).vision_stage.num_tokens == 100
    assert pruning.create("flowcut_llm", num_tokens=320, two_stage=False).vision_stage is None
    assert pruning.create("flowcut_llm", newlines="keep").anyres_newlines
    with pytest.raises(ValueError, match="newlines"):
        pruning.create("flowcut_llm", newlines="none")
    assert "flowcut_llm" in pruning.available()


def test_errors_name_the_fix(model, pixels):
    runner = LlavaNextRunner(model)
    ids, mask = batch(runner, pixels, "right")
    with pytest.raises(ValueError, match=r"layer 3 is out of range .* 4 decoder layers.*set layer to 0\.\.2"):
        runner(ids, pixels, mask, [cut_pruner(layer=3)], image_sizes=SIZES)
    with pytest.raises(ValueError, match="layer must be >= 0"):
        cut_pruner(layer=-1)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        cut_pruner(num_tokens=0)
    with pytest.raises(ValueError, match="At most one LLM-stage pruner"):
        runner(ids, pixels, mask, [cut_pruner(), cut_pruner()], image_sizes=SIZES)
    ends_with_image = [before + after + [IMAGE_TOKEN] * n for (before, after), n in zip(TEXT, [52, 40, 88])]
    ids, mask = pad_batch(ends_with_image, "right")
    with pytest.raises(ValueError, match="last prompt token"):
        runner(ids, pixels, mask, [cut_pruner()], image_sizes=SIZES)


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "llava"


@pytest.mark.parametrize("budget", [640, 320, 160])
def test_flowcut_anyres_configs_use_both_stages(budget):
    cfg = parse_configs([CONFIGS / "llava_next_7b.yaml", CONFIGS / "pruner" / "flowcut_llm.yaml",
                         CONFIGS / "data" / "pope.yaml"], ["--model.init_args.pruner.init_args.num_tokens", str(budget)])
    pruner = cfg.model.init_args.pruner
    assert pruner.class_path == f"{FlowCutLlm.__module__}.{FlowCutLlm.__qualname__}"  # class_path: flowcut_llm, expanded
    assert pruner.init_args.num_tokens == budget and pruner.init_args.layer == 1
    assert pruner.init_args.crop_tokens is None  # the vision stage then keeps budget // 2 per crop
    built = FlowCutLlm(**{k: v for k, v in vars(pruner.init_args).items()})
    assert built.vision_stage is not None and built.vision_stage.num_tokens == budget // 2
    assert pruner.init_args.shared_count is True and pruner.init_args.newlines == "drop"  # the released recipe


@pytest.mark.parametrize("policy", ["compact", "original"])
@pytest.mark.parametrize("two_stage", [False, True], ids=["llm_only", "two_stage"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_packed_cut_equals_padded_cut(model, pixels, side, two_stage, policy, monkeypatch):
    """``packed_prefill=True`` with the LLM-stage cut: layers 0..k packed over the assembled batch,
    layers k+1.. packed over the cut one (one varlen call per layer), the same kept tokens, logits
    and cut layout as the padded run, and the same greedy tokens from the re-padded split cache."""
    import vlm.towers.packed_prefill as packed_module

    hooks = [cut_pruner(crop_tokens=6) if two_stage else cut_pruner(two_stage=False)]
    padded = LlavaNextRunner(model, position_policy=policy)
    packed = LlavaNextRunner(model, position_policy=policy, packed_prefill=True)
    ids, mask = batch(padded, pixels, side, hooks)
    ref, ref_inputs = padded(ids, pixels, mask, hooks, padding_side=side, image_sizes=SIZES)
    lengths, real = [], packed_module.attention
    monkeypatch.setattr(packed_module, "attention", lambda q, k, v, spec: lengths.append(
        torch.diff(spec.cu_seqlens_q).tolist()) or real(q, k, v, spec))
    out, inputs = packed(ids, pixels, mask, hooks, padding_side=side, image_sizes=SIZES)
    before, after = ref_inputs.attention_mask.sum(1).tolist(), ref_inputs.cut.attention_mask.sum(1).tolist()
    assert lengths == [before] * 2 + [after] * 2 and before != after  # cut after layer 1 of 4
    for name in ("index", "attention_mask", "position_ids", "visual_counts"):
        assert torch.equal(getattr(inputs.cut, name), getattr(ref_inputs.cut, name)), name
    valid = ref_inputs.cut.attention_mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=1e-5)
    left_ids, left_mask = batch(padded, pixels, "left", hooks)
    a = padded.generate(left_ids, pixels, left_mask, hooks, max_new_tokens=5, image_sizes=SIZES)
    b = packed.generate(left_ids, pixels, left_mask, hooks, max_new_tokens=5, image_sizes=SIZES)
    assert torch.equal(a.tokens, b.tokens)
