"""SparseVLM (``sparsevlm``): three LLM-stage cuts (after decoder layers 0, 1, 2 of a 4-layer language
model) on a tiny random LLaVA-NeXT and a tiny Qwen2.5-VL. The kept tokens at every cut, the exact
per-cut budgets and the greedy tokens are checked against a plain implementation of the released
computation written here: one sample, transformers' decoder layers one by one with eager attention
and no cache; text raters once from the input embeddings (softmax over the prompt tail of
``E_v . E_t``, mean over visual tokens, strict mean threshold); at each cut the layer's own queries
and keys (input norm, projections, RoPE), the explicit softmax over each rater's whole causal row,
head mean, rater mean, top ``min(K, n - 1)`` visual tokens in order; positions renumbered
(``compact``) or kept (``original``). Batch/padding invariance is checked too."""

from __future__ import annotations

import math

import pytest
import torch

from tests.llava.test_llm_cut import batch, check_batch_invariance
from tests.llava.test_llava_next import SIZES
from tests.pruning.test_pyramiddrop import eager, llava, pixels, qwen, rope_tables, rotate_half  # noqa: F401
from tests.qwen.test_qwen_llm_cut import args, reference_inputs
from tests.qwen.tiny import encode
from vlm import pruning
from vlm.towers.llava_next import LlavaNextRunner
from vlm.towers.qwen import QwenRunner

LAYERS = (0, 1, 2)
COUNTS = (12, 7, 3)
STEPS = 2


def svlm(**kwargs):
    return pruning.create("sparsevlm", layers=LAYERS, counts=COUNTS, **kwargs)


def plain_clusters(x, clusters):
    """DPC-KNN written out: ``x [m, C]`` -> the merged rows ``[clusters, C]`` in the centres' order."""
    m, width = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(width) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:clusters]) / clusters) for row in dist]
    far = max(max(row) for row in dist)
    parent = [min([dist[i][j] for j in range(m) if density[j] > density[i]] or [far]) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-parent[i] * density[i], i))[:clusters]
    assign = [min(range(clusters), key=lambda c: (dist[centres[c]][i], c)) for i in range(m)]
    for c, i in enumerate(centres):
        assign[i] = c
    out = []
    for c in range(clusters):
        members = [i for i in range(m) if assign[i] == c]
        out.append(sum(x[i] for i in members) / (len(members) + 1e-6))
    return out


@torch.no_grad()
def plain_sparsevlm(lm, embeds, pos, scored, marked, probe, policy="compact", recycle=True, adaptive=None):
    """One sample: ``embeds [L, D]``, ``pos [L]`` / ``[3, L]``, ``scored [L]`` (the scored visual
    tokens), ``marked [L]`` (every visual token, layout included), ``probe`` (last prompt row; rows
    after it are generated). Returns per cut (visual labels in order, kept labels, merged states),
    the final labels (ints: assembled rows; tuples: merged tokens) and the final-normed last state."""
    last_visual = int(marked.nonzero().max())
    tail = list(range(last_visual + 1, probe + 1))
    vis = scored.nonzero().flatten()
    rel = (embeds[vis].float() @ embeds[tail].float().T).softmax(1).mean(0)
    raters = [tail[i] for i in range(len(tail)) if rel[i] > rel.mean()]
    h, rows = embeds, list(range(len(embeds)))
    is_scored = {r: bool(scored[r]) for r in rows}
    is_marked = {r: bool(marked[r]) for r in rows}
    stages = []
    with eager(lm):
        for i, block in enumerate(lm.layers):
            length = len(rows)
            mask = torch.full((length, length), torch.finfo(h.dtype).min).triu(1)[None, None]
            h_in = h
            h = block(h[None], attention_mask=mask, position_embeddings=rope_tables(lm, h, pos))[0]
            if i not in LAYERS:
                continue
            stage = LAYERS.index(i)
            at = block.self_attn
            x = block.input_layernorm(h_in)
            d = at.head_dim
            q = at.q_proj(x).view(length, -1, d)
            k = at.k_proj(x).view(length, -1, d)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            cos, sin = (t[0, :, None] for t in rope_tables(lm, x, pos))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            score, matrix = torch.zeros(length), []
            for r in raters:
                p = rows.index(r)
                attn = torch.zeros(length)
                attn[: p + 1] = (torch.einsum("hd,khd->hk", q[p], k[: p + 1]) / math.sqrt(d)).softmax(-1).mean(0)
                score += attn / len(raters)
                matrix.append(attn)
            image = [j for j in range(length) if is_scored[rows[j]]]
            by_score = sorted(image, key=lambda j: (-float(score[j]), j))
            if adaptive is None:
                budget = max(0, min(COUNTS[stage], len(image) - 1))
            else:
                rank = int(torch.linalg.matrix_rank(torch.stack(matrix)[:, image]))
                budget = len(image) - min(len(image) - 1, int(adaptive * (len(image) - rank)))
            best = by_score[:budget]
            deleted = [j for j in by_score if j not in best]
            merged = []
            if recycle and deleted:
                top = deleted[: int(len(deleted) * 0.3) + 1]
                merged = plain_clusters(h[top], int(len(top) / 10) + 1)
            anchor = max(j for j in range(length) if is_marked[rows[j]])
            keep = [j for j in range(length) if not is_scored[rows[j]] or j in best]
            labels = [("m", stage, c) for c in range(len(merged))]
            for lab in labels:
                is_scored[lab] = is_marked[lab] = True
            at_anchor = keep.index(anchor) + 1 if anchor in keep else len([j for j in keep if j < anchor])
            new_h = [h[j] for j in keep]
            new_h[at_anchor:at_anchor] = merged
            new_rows = [rows[j] for j in keep]
            new_rows[at_anchor:at_anchor] = labels
            stages.append(([rows[j] for j in image], {rows[j] for j in best}, merged))
            if policy == "compact":
                pos = torch.arange(len(new_rows)) if pos.dim() == 1 else torch.arange(len(new_rows)).expand(3, -1)
            else:
                cols = [pos[..., j] for j in keep]
                cols[at_anchor:at_anchor] = [pos[..., anchor]] * len(merged)
                pos = torch.stack(cols, -1)
            h, rows = torch.stack(new_h), new_rows
    return stages, rows, lm.norm(h[-1])


def plain_generate(lm, head, embeds, pos, scored, marked, steps, **kwargs) -> list[int]:
    """Greedy tokens, each step recomputed from scratch on the prompt plus the tokens so far."""
    probe = len(embeds) - 1
    tokens = []
    for _ in range(steps):
        _, _, last = plain_sparsevlm(lm, embeds, pos, scored, marked, probe, **kwargs)
        tok = int(head(last).argmax())
        tokens.append(tok)
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([tok]))])
        nxt = pos.max() + 1
        pos = torch.cat([pos, nxt.view(1)]) if pos.dim() == 1 else torch.cat([pos, nxt.view(1, 1).expand(3, 1)], 1)
        scored, marked = (torch.cat([m, m.new_zeros(1)]) for m in (scored, marked))
    return tokens


def record(pruner):
    """Wrap ``keep_stage`` / ``merge_stage`` of this instance: per cut, the probe's counts, the keep
    mask and the merged states (weights @ states) per sample."""
    seen = []
    keep_stage, merge_stage = pruner.keep_stage, pruner.merge_stage

    def keep(probe, stage):
        mask = keep_stage(probe, stage)
        seen.append({"stage": stage, "counts": probe.counts.clone(), "mask": mask.clone(), "merged": None})
        return mask

    def merge(probe, stage, mask):
        out = merge_stage(probe, stage, mask)
        if out is not None:
            weights, counts = out
            states = torch.einsum("bmn,bnd->bmd", weights, probe.states.float())
            seen[-1]["merged"] = [states[b, : int(counts[b])] for b in range(len(counts))]
        return out

    pruner.keep_stage, pruner.merge_stage = keep, merge
    return seen


def check_stages(seen, stages, b):
    """Sample ``b``: at every cut, the same visual tokens kept and the same merged states."""
    assert [s["stage"] for s in seen] == list(range(len(LAYERS)))
    for rec, (labels, best, merged) in zip(seen, stages):
        n = int(rec["counts"][b])
        assert n == len(labels)
        assert rec["mask"][b, :n].tolist() == [lab in best for lab in labels]
        got = [] if rec["merged"] is None else rec["merged"][b]
        assert len(got) == len(merged)
        for g, want in zip(got, merged):
            torch.testing.assert_close(g, want.float(), atol=1e-5, rtol=1e-5)


def expected_counts(n0: int, recycle=True) -> list[tuple[int, int]]:
    """(kept, merged) per cut: ``min(K, n - 1)`` kept, ``int((int(0.3 * deleted) + 1) / 10) + 1`` merged."""
    out, n = [], n0
    for c in COUNTS:
        kept = max(0, min(c, n - 1))
        dropped = n - kept
        merged = int((int(dropped * 0.3) + 1) / 10) + 1 if recycle and dropped else 0
        out.append((kept, merged))
        n = kept + merged
    return out


# --- LLaVA-NeXT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recycle", [True, False])
@torch.no_grad()
def test_llava_cuts_and_generation_equal_plain_code(llava, pixels, recycle):
    runner = LlavaNextRunner(llava)  # compact positions, as the released code
    pruner = svlm(recycle=recycle)
    seen = record(pruner)
    ids, mask = batch(runner, pixels, "right", [pruner])
    _, inputs = runner(ids, pixels, mask, [pruner], image_sizes=SIZES)
    left_ids, left_mask = batch(runner, pixels, "left", [pruner])
    gen = runner.generate(left_ids, pixels, left_mask, [pruner], max_new_tokens=STEPS, image_sizes=SIZES)
    scored_all = inputs.visual_mask & ~inputs.layout_mask
    cut = inputs.cut
    assert cut.layers == LAYERS and len(cut.groups) == 4
    for b in range(3):
        valid = inputs.attention_mask[b].bool()
        rows = valid.nonzero().flatten().tolist()
        scored, marked = scored_all[b, valid], inputs.visual_mask[b, valid]
        n0 = int(scored.sum())
        assert n0 > COUNTS[0]
        embeds, pos = inputs.embeds[b, valid], inputs.position_ids[b, valid]
        stages, kept, _ = plain_sparsevlm(runner.lm, embeds, pos, scored, marked, len(rows) - 1, recycle=recycle)
        counts = expected_counts(n0, recycle)
        assert [(len(best), len(merged)) for _, best, merged in stages] == counts  # budgets exact
        assert [k for k, _ in counts] == list(COUNTS)
        check_stages(seen[:3], stages, b)
        assert cut.index[b][cut.attention_mask[b].bool()].tolist() == [
            rows[r] if isinstance(r, int) else -1 for r in kept]
        layout = int(inputs.layout_mask[b].sum())
        assert [int(c[b]) for c in cut.stage_visual_counts] == [k + m + layout for k, m in counts]
        tokens = plain_generate(runner.lm, runner.lm_head, embeds, pos, scored, marked, gen.tokens.shape[1],
                                recycle=recycle)
        assert gen.tokens[b].tolist() == tokens


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_llava_batch_and_padding_invariance(llava, pixels, side):
    hooks = [svlm()]
    runner = LlavaNextRunner(llava)
    visual = runner.encode_images(pixels, hooks, image_sizes=SIZES)
    check_batch_invariance(runner, pixels, hooks, visual, side, steps=STEPS)


# --- Qwen2.5-VL ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,side,packed", [("compact", "right", False), ("original", "left", False),
                                                ("compact", "left", True)])
@torch.no_grad()
def test_qwen_cuts_and_generation_equal_plain_code(qwen, policy, side, packed):
    enc = encode("qwen2_5_vl", side)
    runner = QwenRunner(qwen, position_policy=policy, packed_prefill=packed)
    pruner = svlm()
    seen = record(pruner)
    logits, inputs = runner(*args(enc), [pruner], padding_side=side)
    gen = runner.generate(*args(encode("qwen2_5_vl", "left")), [pruner], max_new_tokens=STEPS)
    lm = qwen.model.language_model
    cut = inputs.cut
    for b, sample in enumerate(reference_inputs(qwen, enc, policy=policy)):
        embeds, pos, scored = sample["embeds"][0], sample["positions"][:, 0], sample["visual"]
        n0 = int(scored.sum())
        stages, kept, last = plain_sparsevlm(lm, embeds, pos, scored, scored, len(embeds) - 1, policy=policy)
        assert [(len(best), len(merged)) for _, best, merged in stages] == expected_counts(n0)
        check_stages(seen[:3], stages, b)
        offset = int(inputs.attention_mask[b].nonzero()[0])
        index = cut.index[b][cut.attention_mask[b].bool()]
        assert [int(i) - offset if i >= 0 else -1 for i in index] == [r if isinstance(r, int) else -1 for r in kept]
        at = cut.attention_mask[b].nonzero().flatten()[-1]
        torch.testing.assert_close(logits[b, at], qwen.lm_head(last), atol=1e-5, rtol=1e-5)
        tokens = plain_generate(lm, qwen.lm_head, embeds, pos, scored, scored, gen.tokens.shape[1], policy=policy)
        assert gen.tokens[b].tolist() == tokens


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_qwen_a_sample_does_not_depend_on_its_batch(qwen, side):
    runner = QwenRunner(qwen)
    pruner = svlm()
    together, inputs = runner(*args(encode("qwen2_5_vl", side)), [pruner], padding_side=side)
    for b in range(3):
        one = encode("qwen2_5_vl", side, slice(b, b + 1))
        alone, single = runner(*args(one), [pruner], padding_side=side)
        assert [c.tolist() for c in single.cut.stage_visual_counts] == [c[b : b + 1].tolist()
                                                                         for c in inputs.cut.stage_visual_counts]
        torch.testing.assert_close(together[b][inputs.cut.attention_mask[b].bool()], alone[0], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_qwen_paper_rank_rule_equals_plain_code(qwen):
    enc = encode("qwen2_5_vl", "right")
    runner = QwenRunner(qwen, position_policy="compact")
    pruner = svlm(adaptive=0.3)
    seen = record(pruner)
    _, inputs = runner(*args(enc), [pruner], padding_side="right")
    for b, sample in enumerate(reference_inputs(qwen, enc, policy="compact")):
        embeds, pos, scored = sample["embeds"][0], sample["positions"][:, 0], sample["visual"]
        stages, _, _ = plain_sparsevlm(qwen.model.language_model, embeds, pos, scored, scored, len(embeds) - 1,
                                       adaptive=0.3)
        check_stages(seen[:3], stages, b)
        n = int(scored.sum())
        assert 0 < len(stages[0][1]) < n  # the rule cut something and kept something


# --- budgets and errors -------------------------------------------------------------------------------------
def test_released_table_and_errors():
    released = pruning.create("sparsevlm")
    assert released.cuts() == (2, 6, 15) and released.layer == 2 and not released.score_next
    assert released.counts == (300, 200, 110)
    assert pruning.create("sparsevlm", num_tokens=128).counts == (303, 110, 36)
    assert pruning.create("sparsevlm", num_tokens=64).counts == (66, 30, 17)
    with pytest.raises(ValueError, match="no released keep counts"):
        pruning.create("sparsevlm", num_tokens=100)
    with pytest.raises(ValueError, match="pass counts"):
        pruning.create("sparsevlm", layers=(1, 2, 3))
    with pytest.raises(ValueError, match="one positive count per layer"):
        pruning.create("sparsevlm", layers=(1, 2), counts=(3,))
    with pytest.raises(ValueError, match="recycle_ratio"):
        pruning.create("sparsevlm", recycle_ratio=1.0)
