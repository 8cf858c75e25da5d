"""PyramidDrop (``pyramiddrop``): several LLM-stage cuts on a tiny random LLaVA-NeXT (4-layer Llama, 4
query / 2 key-value heads) and a tiny Qwen2.5-VL (4-layer language model), stages at layers 1, 2, 3
(official ``layer_list`` numbering). The kept tokens at every stage, the exact per-stage budgets and
the greedy tokens are checked against a plain implementation of the released ``pdrop_forward`` /
``pdrop_rank_drop`` written here: the sample alone (no padding), transformers' decoder layers run one
by one with eager attention and no cache, and at each boundary the last instruction token's query and
every key re-projected with the *next* layer's input norm, q/k projections and RoPE, the explicit
softmax over the whole causal row, head mean, top ``int(N * ratio)`` image tokens in order, positions
renumbered 0..L'-1 (``compact``; ``original`` keeps them). Batch/padding invariance and the packed
prefill are checked too."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from tests.llava.test_llm_cut import batch, check_batch_invariance
from tests.llava.test_llava_next import SIZES, tiny_llava_next
from tests.qwen.test_qwen_llm_cut import args, reference_inputs
from tests.qwen.tiny import encode, tiny_model
from vlm import pruning
from vlm.pruning.pyramiddrop import average_tokens
from vlm.towers.llava_next import LlavaNextRunner
from vlm.towers.qwen import QwenRunner

LAYERS = (1, 2, 3)  # official numbering: cuts after decoder layers 0, 1, 2 of 4
RATIOS = (0.5, 0.25, 0.125)
STEPS = 2


def sharpen(lm, factor: float = 4.0):
    """Scale every query/key projection: a random tiny model attends almost uniformly, so the image
    scores sit within float noise of each other and no two implementations rank them alike."""
    with torch.no_grad():
        for block in lm.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj):
                proj.weight.mul_(factor)
    return lm


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava_next(text_layers=4)
    sharpen(LlavaNextRunner(model).lm)
    return model


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 5, 3, 32, 32)


@pytest.fixture(scope="module")
def qwen():
    model = tiny_model("qwen2_5_vl", text_layers=4)
    sharpen(model.model.language_model)
    return model


def pdrop(**kwargs):
    return pruning.create("pyramiddrop", layers=LAYERS, ratios=RATIOS, **kwargs)


# --- the plain implementation -------------------------------------------------------------------------
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


@contextmanager
def eager(lm):
    previous, lm.config._attn_implementation = lm.config._attn_implementation, "eager"
    try:
        yield
    finally:
        lm.config._attn_implementation = previous


def rope_tables(lm, h, pos):
    """cos/sin ``[1, L, d]`` of positions ``pos`` (``[L]`` or ``[3, L]``)."""
    ids = pos[None] if pos.dim() == 1 else pos[:, None]
    return lm.rotary_emb(h[None], position_ids=ids)


@torch.no_grad()
def plain_pdrop(lm, embeds, pos, scored, probe, layers=LAYERS, ratios=RATIOS, policy="compact", score_next=True):
    """One sample: ``embeds [L, D]``, ``pos [L]`` / ``[3, L]``, ``scored [L]`` (the image tokens),
    ``probe`` (row of the last instruction token; rows after it are generated text). Returns the kept
    image rows after each stage, the final rows and the final-normed last hidden state."""
    h, rows = embeds, list(range(len(embeds)))
    n0 = int(scored.sum())
    stages = []
    with eager(lm):
        for i, block in enumerate(lm.layers):
            length = len(rows)
            mask = torch.full((length, length), torch.finfo(h.dtype).min).triu(1)[None, None]
            h_in = h
            h = block(h[None], attention_mask=mask, position_embeddings=rope_tables(lm, h, pos))[0]
            if i + 1 not in layers:
                continue
            stage = layers.index(i + 1)
            scorer = lm.layers[i + 1] if score_next else block
            x = scorer.input_layernorm(h if score_next else h_in)
            at = scorer.self_attn
            d = at.head_dim
            q = at.q_proj(x).view(length, -1, d)
            k = at.k_proj(x).view(length, -1, d)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            cos, sin = (t[0, :, None] for t in rope_tables(lm, x, pos))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            p = rows.index(probe)
            attn = (torch.einsum("hd,khd->hk", q[p], k[: p + 1]) / math.sqrt(d)).softmax(-1)  # whole causal row
            score = attn.mean(0)
            image = [j for j in range(length) if scored[rows[j]]]
            best = sorted(image, key=lambda j: (-float(score[j]), j))[: int(n0 * ratios[stage])]
            keep = [j for j in range(length) if not scored[rows[j]] or j in best]
            h, rows = h[keep], [rows[j] for j in keep]
            if policy == "compact":
                pos = torch.arange(len(rows)) if pos.dim() == 1 else torch.arange(len(rows)).expand(3, -1)
            else:
                pos = pos[..., keep]
            stages.append([r for r in rows if scored[r]])
    return stages, rows, lm.norm(h[-1])


def plain_generate(lm, head, embeds, pos, scored, steps, **kwargs) -> list[int]:
    """Greedy tokens, each step recomputed from scratch on the prompt plus the tokens so far (the
    cuts, decided by the probe row, do not change: a row sees only the rows before it)."""
    probe = len(embeds) - 1
    tokens = []
    for _ in range(steps):
        _, _, last = plain_pdrop(lm, embeds, pos, scored, probe, **kwargs)
        tok = int(head(last).argmax())
        tokens.append(tok)
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([tok]))])
        nxt = pos.max() + 1
        pos = torch.cat([pos, nxt.view(1)]) if pos.dim() == 1 else torch.cat([pos, nxt.view(1, 1).expand(3, 1)], 1)
        scored = torch.cat([scored, scored.new_zeros(1)])
    return tokens


def record(pruner):
    """Wrap ``pruner.keep_stage`` (this instance): [(stage, counts, mask)] per call."""
    seen = []
    original = pruner.keep_stage

    def keep_stage(probe, stage):
        mask = original(probe, stage)
        seen.append((stage, probe.counts.clone(), probe.initial_counts.clone(), mask.clone()))
        return mask

    pruner.keep_stage = keep_stage
    return seen


def survivors(seen, b: int) -> list[list[int]]:
    """Sample ``b``'s kept image tokens after each stage, as ordinals among its original ones."""
    alive = list(range(int(seen[0][2][b])))
    out = []
    for stage, counts, _, mask in seen:
        assert len(alive) == int(counts[b])
        alive = [a for a, m in zip(alive, mask[b, : len(alive)].tolist()) if m]
        out.append(alive)
    return out


def ordinals(stages, scored) -> list[list[int]]:
    image = scored.nonzero().flatten().tolist()
    return [[image.index(r) for r in stage] for stage in stages]


# --- LLaVA-NeXT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_with", ["next", "current"])
@torch.no_grad()
def test_llava_stages_and_generation_equal_plain_code(llava, pixels, score_with):
    runner = LlavaNextRunner(llava)  # compact positions, as the released code
    pruner = pdrop(score_with=score_with)
    seen = record(pruner)
    ids, mask = batch(runner, pixels, "right", [pruner])
    _, inputs = runner(ids, pixels, mask, [pruner], image_sizes=SIZES)
    assert [s for s, *_ in seen] == [0, 1, 2]
    left_ids, left_mask = batch(runner, pixels, "left", [pruner])
    gen = runner.generate(left_ids, pixels, left_mask, [pruner], max_new_tokens=STEPS, image_sizes=SIZES)
    scored_all = inputs.visual_mask & ~inputs.layout_mask
    cut = inputs.cut
    assert cut.layers == (0, 1, 2) and len(cut.groups) == 4
    for b in range(3):
        valid = inputs.attention_mask[b].bool()
        rows = valid.nonzero().flatten().tolist()
        scored = scored_all[b, valid]
        n0 = int(scored.sum())
        embeds, pos = inputs.embeds[b, valid], inputs.position_ids[b, valid]
        stages, kept, _ = plain_pdrop(runner.lm, embeds, pos, scored, len(rows) - 1, score_next=score_with == "next")
        assert [len(s) for s in stages] == [int(n0 * r) for r in RATIOS]  # budgets exact
        assert survivors(seen[:3], b) == ordinals(stages, scored)
        assert cut.index[b][cut.attention_mask[b].bool()].tolist() == [rows[r] for r in kept]
        layout = int(inputs.layout_mask[b].sum())
        assert [int(c[b]) for c in cut.stage_visual_counts] == [int(n0 * r) + layout for r in RATIOS]
        tokens = plain_generate(runner.lm, runner.lm_head, embeds, pos, scored, gen.tokens.shape[1],
                                score_next=score_with == "next")
        assert gen.tokens[b].tolist() == tokens


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_llava_batch_and_padding_invariance(llava, pixels, side):
    hooks = [pdrop()]
    runner = LlavaNextRunner(llava)
    visual = runner.encode_images(pixels, hooks, image_sizes=SIZES)
    check_batch_invariance(runner, pixels, hooks, visual, side, steps=STEPS)


# --- Qwen2.5-VL ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,side,packed", [("compact", "right", False), ("original", "left", False),
                                                ("compact", "left", True)])
@torch.no_grad()
def test_qwen_stages_and_generation_equal_plain_code(qwen, policy, side, packed):
    enc = encode("qwen2_5_vl", side)
    runner = QwenRunner(qwen, position_policy=policy, packed_prefill=packed)
    pruner = pdrop()
    seen = record(pruner)
    logits, inputs = runner(*args(enc), [pruner], padding_side=side)
    gen = runner.generate(*args(encode("qwen2_5_vl", "left")), [pruner], max_new_tokens=STEPS)
    lm = qwen.model.language_model
    cut = inputs.cut
    for b, sample in enumerate(reference_inputs(qwen, enc, policy=policy)):
        embeds, pos, scored = sample["embeds"][0], sample["positions"][:, 0], sample["visual"]
        n0 = int(scored.sum())
        stages, kept, last = plain_pdrop(lm, embeds, pos, scored, len(embeds) - 1, policy=policy)
        assert [len(s) for s in stages] == [int(n0 * r) for r in RATIOS]
        assert survivors(seen[:3], b) == ordinals(stages, scored)
        offset = int(inputs.attention_mask[b].nonzero()[0])
        assert (cut.index[b][cut.attention_mask[b].bool()] - offset).tolist() == kept
        at = cut.attention_mask[b].nonzero().flatten()[-1]
        torch.testing.assert_close(logits[b, at], qwen.lm_head(last), atol=1e-5, rtol=1e-5)
        tokens = plain_generate(lm, qwen.lm_head, embeds, pos, scored, gen.tokens.shape[1], policy=policy)
        assert gen.tokens[b].tolist() == tokens


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_qwen_a_sample_does_not_depend_on_its_batch(qwen, side):
    runner = QwenRunner(qwen)
    pruner = pdrop()
    together, inputs = runner(*args(encode("qwen2_5_vl", side)), [pruner], padding_side=side)
    for b in range(3):
        one = encode("qwen2_5_vl", side, slice(b, b + 1))
        alone, single = runner(*args(one), [pruner], padding_side=side)
        assert [c.tolist() for c in single.cut.stage_visual_counts] == [c[b : b + 1].tolist()
                                                                         for c in inputs.cut.stage_visual_counts]
        torch.testing.assert_close(together[b][inputs.cut.attention_mask[b].bool()], alone[0], atol=1e-6, rtol=1e-6)


# --- budgets and errors -------------------------------------------------------------------------------------
def test_budget_mapping_and_errors():
    released = pruning.create("pyramiddrop")
    assert released.layers == (8, 16, 24) and released.ratios == RATIOS and released.cuts() == (7, 15, 23)
    assert released.layer == 7 and released.score_next and released.num_tokens == 270  # (576+288+144+72)/4
    solved = pruning.create("pyramiddrop", num_tokens=192)
    assert abs(average_tokens(solved.layers, solved.ratios, 32, 576) - 192) <= len(solved.layers)
    paper = pruning.create("pyramiddrop", layers=(2, 6, 12), ratios=(0.5, 0.25, 0.125))
    assert paper.num_tokens == round(average_tokens((2, 6, 12), RATIOS, 32, 576))
    with pytest.raises(ValueError, match="cannot be a layer-average"):
        pruning.create("pyramiddrop", num_tokens=64)
    with pytest.raises(ValueError, match="not both"):
        pruning.create("pyramiddrop", num_tokens=192, ratios=RATIOS)
    with pytest.raises(ValueError, match="non-increasing"):
        pruning.create("pyramiddrop", layers=(1, 2), ratios=(0.25, 0.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        pruning.create("pyramiddrop", layers=(2, 2))


@torch.no_grad()
def test_cut_layers_must_fit_the_model(qwen):
    runner = QwenRunner(qwen)
    with pytest.raises(ValueError, match=r"cut layers \[1, 2, 3\] are out of range"):
        runner.decoder([pruning.create("pyramiddrop", layers=(2, 3, 4), ratios=RATIOS)])
