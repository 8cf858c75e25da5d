"""LLM-stage cuts (``flowcut_llm``) on Qwen2.5-VL and Qwen3-VL (issue 25, items 2-4), on tiny random
models with a 4-layer language model (4 query / 2 key-value heads; Qwen3-VL: per-head ``q_norm`` /
``k_norm``, interleaved M-RoPE, DeepStack added after layers 0 and 1).

Every reference is built from transformers alone, per sample, without padding:

* inputs: transformers' merged image features (``get_image_features``) at the image placeholders
  (at the units our vision stage kept, for the two-stage recipe), its 3-D positions
  (``get_rope_index`` on the processor's output) gathered at the same tokens, its DeepStack features;
* scores (a): transformers' own language model on the sample's full sequence with the positions
  passed explicitly, its attention function swapped for one that records the post-norm, post-RoPE
  query/key/value tensors it is handed at layer ``k``; FlowCut's rule in plain code on those
  (key/value heads repeated, per-head softmaxes over the visual tokens, Python sort);
* logits and greedy tokens (b): transformers' language model split in two instances of its own
  class with the weights copied, layers ``0..k`` (on the full sequence; its DeepStack taps on all
  visual tokens) and layers ``k+1..`` (on the reference's kept rows with their original 3-D
  positions; its DeepStack taps on the kept visual tokens only), run step by step with explicit
  positions: each decoded token at ``max position + 1`` onwards in both halves (``rope_deltas``),
  each half with its own KV cache.

Then (c): a sample alone equals the sample in a batch (padded on either side, or packed).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tests.qwen.tiny import encode, image_rows, tiny_model
from vlm import pruning
from vlm.towers.llava import image_runs
from vlm.towers.qwen import QwenRunner

ATOL = 1e-5  # probe tensors (O(1) after Qwen3's k_norm); measured at most 8.3e-7
LOGITS_ATOL = 1e-6  # logits (|logit| < 0.5 on these models); measured at most 1.3e-7
TEXT_LAYERS = 4
BUDGET = 5  # visual tokens per sample after the cut; the samples carry 15 + 4, 16 and 12
CROP = 6  # the two-stage recipe's vision budget per image: 6 + 4, 6, 6 reach the cut
STEPS = 6
CAPTURE = "vlm_test_capture"


@pytest.fixture(scope="module")
def deep(kind):
    return tiny_model(kind, text_layers=TEXT_LAYERS)


def cut_pruner(layer: int, two_stage: bool, num_tokens: int = BUDGET):
    return pruning.create("flowcut_llm", num_tokens=num_tokens, layer=layer, two_stage=two_stage,
                          crop_tokens=CROP if two_stage else None)


def args(enc):
    return enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"]


# --- references from transformers' own parts ------------------------------------------------------
@torch.no_grad()
def reference_inputs(model, enc, keep=None, policy="original") -> list[dict]:
    """Per sample: ``embeds [1, L, D]``, ``positions [3, 1, L]``, ``visual [L]`` bool, ``stacks`` (the
    DeepStack features ``[L, D]`` per tap, zeros off the images; empty for Qwen2.5-VL), from
    transformers alone; ``keep[i]`` (unit indices) are the tokens of image ``i`` that reach the LLM
    (all of them for None). ``compact``: positions 0..L-1 on every axis."""
    inner = model.model
    feats = inner.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    deepstack = getattr(feats, "deepstack_features", None) or []
    rope, _ = inner.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                   attention_mask=enc["attention_mask"])
    out, image = [], 0
    for b in range(enc["input_ids"].shape[0]):
        valid = enc["attention_mask"][b].bool()
        ids = enc["input_ids"][b][valid]
        embeds = inner.get_input_embeddings()(ids).clone()
        cols = torch.ones(len(ids), dtype=torch.bool)
        visual = torch.zeros(len(ids), dtype=torch.bool)
        stacks = [torch.zeros_like(embeds) for _ in deepstack]
        for start, end in image_runs(ids, model.config.image_token_id):
            embeds[start:end] = feats.pooler_output[image]
            for s, per_image in zip(stacks, deepstack):
                s[start:end] = per_image[image]
            visual[start:end] = True
            if keep is not None:
                cols[start:end] = False
                cols[[start + u for u in keep[image]]] = True
            image += 1
        positions = rope[:, b][:, valid][:, cols]
        n = int(cols.sum())
        if policy == "compact":
            positions = torch.arange(n).expand(3, -1)
        out.append(dict(embeds=embeds[cols][None], positions=positions[:, None], visual=visual[cols],
                        stacks=[s[cols] for s in stacks]))
    return out


def deepstack_kwargs(sample: dict, rows: list[int], taps: range) -> dict:
    """transformers' DeepStack arguments over the rows ``rows`` of ``sample``: the features that
    follow the full model's decoder layers ``taps``, for a language model whose first layer is
    ``taps[0]`` (it adds its ``j``-th after its own layer ``j``), at the visual rows among ``rows``."""
    if not sample["stacks"] or not len(taps):
        return {}
    visual = sample["visual"][rows]
    return dict(visual_pos_masks=visual[None],
                deepstack_visual_embeds=[sample["stacks"][i][rows][visual] for i in taps])


class Capture:
    """transformers' language model with its attention function swapped for one that records the
    ``query, key, value`` it is handed (post ``q_norm``/``k_norm`` and RoPE) at every layer."""

    def __init__(self, lm):
        self.lm, self.qkv = lm, {}

        def forward(module, query, key, value, attention_mask, **kwargs):
            self.qkv[module.layer_idx] = (query[0].clone(), key[0].clone(), value[0].clone())
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(CAPTURE, forward)
        AttentionMaskInterface.register(CAPTURE, sdpa_mask)

    @torch.no_grad()
    def __call__(self, sample: dict) -> dict:
        config = self.lm.config
        previous, config._attn_implementation = config._attn_implementation, CAPTURE
        try:
            rows = list(range(sample["embeds"].shape[1]))
            self.lm(inputs_embeds=sample["embeds"], position_ids=sample["positions"], use_cache=False,
                    **deepstack_kwargs(sample, rows, range(len(sample["stacks"]))))
        finally:
            config._attn_implementation = previous
        return self.qkv


def plain_flowcut_rows(q, k, v, visual: list[bool], budget: int) -> list[int]:
    """FlowCut's LLM score, literally, from one layer's post-RoPE ``q [H, L, d]``, ``k, v [Hkv, L, d]``
    (key/value heads repeated for every query head), the probe being the last token. Returns the
    kept rows: every text row and the ``budget`` best visual rows (ties: the earlier)."""
    heads, length, d = q.shape
    k, v = (t.repeat_interleave(heads // t.shape[0], 0) for t in (k, v))
    vis = [r for r in range(length) if visual[r]]
    probe = length - 1
    relation = (torch.einsum("hd,hnd->hn", q[:, probe], k[:, vis]) / math.sqrt(d)).softmax(-1).mean(0)
    semantic = (torch.einsum("hd,hnd->hn", v[:, probe], v[:, vis]) / math.sqrt(d)).softmax(-1).mean(0)
    density = v[:, vis].mean(0).abs().sum(-1)
    score = ((relation / relation.sum() + semantic / semantic.sum()) * density).tolist()
    best = {vis[j] for j in sorted(range(len(vis)), key=lambda j: (-score[j], j))[:budget]}
    return [r for r in range(length) if not visual[r] or r in best]


def split_lm(lm, k: int):
    """Two instances of transformers' own text-model class: layers ``0..k`` and ``k+1..``, with
    ``lm``'s weights (the final norm in both; its input is what we hand on)."""
    parts = []
    for layers in (range(0, k + 1), range(k + 1, len(lm.layers))):
        config = copy.deepcopy(lm.config)
        config.num_hidden_layers = len(layers)
        if getattr(config, "layer_types", None):
            config.layer_types = [lm.config.layer_types[i] for i in layers]
        part = type(lm)(config).eval()
        for j, i in enumerate(layers):
            part.layers[j].load_state_dict(lm.layers[i].state_dict())
        part.norm.load_state_dict(lm.norm.state_dict())
        parts.append(part)
    return parts


@torch.no_grad()
def reference_cut_generate(model, parts, k: int, sample: dict, rows: list[int], steps: int, policy: str):
    """transformers' language model cut after layer ``k`` (module docstring), step by step: the
    logits ``[L', V]`` of the kept rows ``rows`` at the prefill, ``steps`` greedy tokens, and the
    logits ``[steps, V]`` each token was chosen from."""
    head, tail = parts
    taps = len(sample["stacks"])
    grabbed = []
    hook = head.norm.register_forward_pre_hook(lambda m, a: grabbed.append(a[0]))
    try:
        caches = DynamicCache(config=head.config), DynamicCache(config=tail.config)
        positions = sample["positions"]
        everything = list(range(positions.shape[-1]))
        head(inputs_embeds=sample["embeds"], position_ids=positions, cache=caches[0], use_cache=True,
             **deepstack_kwargs(sample, everything, range(min(taps, k + 1))))
        kept_positions = positions[:, :, rows] if policy == "original" else torch.arange(len(rows)).expand(3, 1, -1)
        h = tail(inputs_embeds=grabbed[-1][:, rows], position_ids=kept_positions, cache=caches[1], use_cache=True,
                 **deepstack_kwargs(sample, rows, range(k + 1, taps))).last_hidden_state
        logits = model.lm_head(h)[0]
        chosen = [logits[-1]]
        tokens = [logits[-1].argmax()]
        starts = int(positions.max()) + 1, int(kept_positions.max()) + 1  # rope_deltas of each half
        for s in range(steps - 1):
            x = model.model.language_model.get_input_embeddings()(tokens[-1].view(1, 1))
            head(inputs_embeds=x, position_ids=torch.full((3, 1, 1), starts[0] + s), cache=caches[0], use_cache=True)
            h = tail(inputs_embeds=grabbed[-1], position_ids=torch.full((3, 1, 1), starts[1] + s), cache=caches[1],
                     use_cache=True).last_hidden_state
            chosen.append(model.lm_head(h)[0, -1])
            tokens.append(chosen[-1].argmax())
    finally:
        hook.remove()
    return logits, torch.stack(tokens), torch.stack(chosen)


def vision_keep(runner, enc, pruner) -> list[list[int]] | None:
    """The units our vision stage keeps per image (None without one: every unit)."""
    if pruner.vision_stage is None:
        return None
    visual = runner.encode_images(enc["pixel_values"], enc["image_grid_thw"], [pruner])
    return [visual.positions[i, : int(c)].tolist() for i, c in enumerate(visual.counts)]


def sample_rows(inputs, b: int) -> list[int]:
    """Sample ``b``'s kept rows, counted from its first valid token of the assembled sequence."""
    cut = inputs.cut
    offset = int(inputs.attention_mask[b].nonzero()[0])
    return (cut.index[b][cut.attention_mask[b].bool()] - offset).tolist()


# --- (a) the kept set ----------------------------------------------------------------------------
@pytest.mark.parametrize("two_stage", [False, True], ids=["llm_only", "two_stage"])
@pytest.mark.parametrize("layer", [0, 1])
@torch.no_grad()
def test_kept_set_and_probe_equal_transformers_attention_inputs(deep, layer, two_stage):
    """The probe our cut scores with is transformers' own query/keys/values of layer ``k`` (the
    query re-projected with Qwen3's ``q_norm`` and the probe token's 3-D M-RoPE), and the kept set
    is FlowCut's rule applied in plain code to those."""
    kind = deep.config.model_type
    enc = encode(kind, "right")
    runner = QwenRunner(deep)
    pruner = cut_pruner(layer, two_stage)
    probes = []
    keep = pruner.keep
    pruner.keep = lambda probe: probes.append(probe) or keep(probe)
    _, inputs = runner(*args(enc), [pruner])
    capture = Capture(deep.model.language_model)
    refs = reference_inputs(deep, enc, vision_keep(runner, enc, pruner))
    assert inputs.cut.visual_counts.tolist() == [min(BUDGET, int(r["visual"].sum())) for r in refs]
    (probe,) = probes
    for b, sample in enumerate(refs):
        q, k, v = capture(sample)[layer]
        vis = sample["visual"].nonzero().flatten()
        n = len(vis)
        assert int(probe.counts[b]) == n
        torch.testing.assert_close(probe.query[b], q[:, -1], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(probe.query_value[b], v[:, -1], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(probe.keys[b, :, :n], k[:, vis], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(probe.values[b, :, :n], v[:, vis], atol=ATOL, rtol=1e-5)
        assert sample_rows(inputs, b) == plain_flowcut_rows(q, k, v, sample["visual"].tolist(), BUDGET)


@torch.no_grad()
def test_qwen3_probe_query_needs_q_norm():
    """The re-projection applies Qwen3's per-head ``q_norm`` (Qwen2.5-VL has none): from layer 1's
    own input it gives transformers' query at the probe token, and without the norm it would not."""
    model = tiny_model("qwen3_vl", text_layers=TEXT_LAYERS)
    lm = model.model.language_model
    enc = encode("qwen3_vl", "right", slice(2, 3))
    (sample,) = reference_inputs(model, enc)
    layer_input = []
    hook = lm.layers[1].register_forward_pre_hook(lambda m, a: layer_input.append(a[0]))
    try:
        q, k, v = Capture(lm)(sample)[1]
    finally:
        hook.remove()
    decoder = QwenRunner(model).decoder([cut_pruner(1, False)])
    assert decoder.q_norm_per_head is True
    assert QwenRunner(tiny_model("qwen2_5_vl")).decoder([cut_pruner(0, False)]).q_norm_per_head is None
    h = layer_input[0]
    rope = lm.rotary_emb(h, position_ids=sample["positions"])
    last = torch.tensor([h.shape[1] - 1])
    probe, _ = decoder.probe(h, rope, k[None], v[None], sample["visual"][None], last)
    torch.testing.assert_close(probe.query[0], q[:, -1], atol=ATOL, rtol=1e-5)
    decoder.q_norm_per_head = None
    without, _ = decoder.probe(h, rope, k[None], v[None], sample["visual"][None], last)
    assert (without.query[0] - q[:, -1]).abs().max() > 1e-2


# --- (b) logits and greedy tokens against transformers split at the cut ---------------------------
#: (layer, two_stage, side, packed): each value of each axis at least twice, both sides of each
#: prefill; Qwen3-VL's DeepStack tap 1 comes after a cut after layer 0 (padded and packed)
CASES = [(0, False, "left", False), (1, True, "right", False), (0, True, "left", True), (1, False, "right", True),
         (0, False, "right", True)]


@pytest.mark.parametrize("layer,two_stage,side,packed", CASES,
                         ids=[f"k{k}-{'two_stage' if t else 'llm_only'}-{s}-{'packed' if p else 'padded'}"
                              for k, t, s, p in CASES])
@torch.no_grad()
def test_cut_logits_and_generation_equal_transformers_split_at_the_cut(deep, layer, two_stage, side, packed):
    kind = deep.config.model_type
    enc = encode(kind, side)
    runner = QwenRunner(deep, packed_prefill=packed)
    pruner = cut_pruner(layer, two_stage)
    logits, inputs = runner(*args(enc), [pruner], padding_side=side)
    gen = runner.generate(*args(enc), [pruner], max_new_tokens=STEPS)
    capture = Capture(deep.model.language_model)
    parts = split_lm(deep.model.language_model, layer)
    for b, sample in enumerate(reference_inputs(deep, enc, vision_keep(runner, enc, pruner))):
        q, k, v = capture(sample)[layer]
        rows = plain_flowcut_rows(q, k, v, sample["visual"].tolist(), BUDGET)
        assert sample_rows(inputs, b) == rows
        ref_logits, ref_tokens, _ = reference_cut_generate(deep, parts, layer, sample, rows, STEPS, "original")
        kept = inputs.cut.attention_mask[b].bool()
        torch.testing.assert_close(logits[b][kept], ref_logits, atol=LOGITS_ATOL, rtol=1e-6)
        assert gen.tokens[b].tolist() == ref_tokens.tolist()
        # the positions after the cut are the kept tokens' own 3-D ones; decoding continues at rope_deltas
        assert torch.equal(inputs.cut.position_ids[:, b][:, kept], sample["positions"][:, 0, rows])
        assert int(inputs.next_position[b]) == int(sample["positions"].max()) + 1


@torch.no_grad()
def test_compact_switch_renumbers_after_the_cut(deep):
    """``compact``: the assembled sequence is numbered 0..L-1 and the cut one 0..L'-1 (every axis),
    each half decoding from its own length."""
    kind = deep.config.model_type
    enc = encode(kind, "left")
    runner = QwenRunner(deep, position_policy="compact")
    pruner = cut_pruner(0, False)
    logits, inputs = runner(*args(enc), [pruner], padding_side="left")
    gen = runner.generate(*args(enc), [pruner], max_new_tokens=STEPS)
    capture = Capture(deep.model.language_model)
    parts = split_lm(deep.model.language_model, 0)
    for b, sample in enumerate(reference_inputs(deep, enc, policy="compact")):
        q, k, v = capture(sample)[0]
        rows = plain_flowcut_rows(q, k, v, sample["visual"].tolist(), BUDGET)
        assert sample_rows(inputs, b) == rows
        ref_logits, ref_tokens, _ = reference_cut_generate(deep, parts, 0, sample, rows, STEPS, "compact")
        kept = inputs.cut.attention_mask[b].bool()
        torch.testing.assert_close(logits[b][kept], ref_logits, atol=LOGITS_ATOL, rtol=1e-6)
        assert gen.tokens[b].tolist() == ref_tokens.tolist()
        assert inputs.cut.position_ids[:, b][:, kept].tolist() == [list(range(len(rows)))] * 3


@pytest.mark.parametrize("policy", ["original", "compact"])
@torch.no_grad()
def test_decode_step_logits_equal_transformers_split_at_the_cut(deep, policy):
    """Each decoding step's logits from the split KV cache (the runner's own decode path, fed the
    reference's tokens) equal the reference's, so positions and caches agree at every step, not
    only where the argmax happens to."""
    kind = deep.config.model_type
    enc = encode(kind, "left")
    runner = QwenRunner(deep, position_policy=policy)
    pruner = cut_pruner(0, True)
    decoder = runner.decoder([pruner])
    cache = DynamicCache(config=runner.lm.config)
    h, inputs = runner.prefill(runner.prepare(*args(enc), hooks=[pruner], padding_side="left"), decoder, "left", cache)
    capture = Capture(deep.model.language_model)
    parts = split_lm(deep.model.language_model, 0)
    refs = []
    for b, sample in enumerate(reference_inputs(deep, enc, vision_keep(runner, enc, pruner), policy)):
        q, k, v = capture(sample)[0]
        rows = plain_flowcut_rows(q, k, v, sample["visual"].tolist(), BUDGET)
        refs.append(reference_cut_generate(deep, parts, 0, sample, rows, STEPS, policy))
    tokens = torch.stack([r[1] for r in refs])  # [B, STEPS]
    chosen = torch.stack([r[2] for r in refs])  # [B, STEPS, V]
    torch.testing.assert_close(runner.lm_head(h[:, -1]), chosen[:, 0], atol=LOGITS_ATOL, rtol=1e-6)
    groups = inputs.cut.groups
    for s in range(1, STEPS):
        groups = [g.next_token() for g in groups]
        h = decoder.decode(runner.embed_tokens(tokens[:, s - 1 : s]), groups, cache)
        torch.testing.assert_close(runner.lm_head(h[:, -1]), chosen[:, s], atol=LOGITS_ATOL, rtol=1e-6)


# --- keep-all parity, the split cache --------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_budget_above_visual_count_equals_unpruned(deep, side, packed):
    """A cut that keeps everything is the unpruned model (DeepStack, positions and decoding included)."""
    enc = encode(deep.config.model_type, side)
    runner = QwenRunner(deep, packed_prefill=packed)
    ref, ref_inputs = QwenRunner(deep)(*args(enc), padding_side=side)
    ours, inputs = runner(*args(enc), [cut_pruner(0, False, num_tokens=1000)], padding_side=side)
    cut = inputs.cut
    assert torch.equal(cut.attention_mask, ref_inputs.attention_mask)
    assert torch.equal(cut.visual_counts, ref_inputs.visual_counts)
    valid = ref_inputs.attention_mask.bool()
    assert torch.equal(cut.position_ids[:, valid], ref_inputs.position_ids[:, valid])
    torch.testing.assert_close(ours[valid], ref[valid], atol=LOGITS_ATOL, rtol=1e-6)
    full = QwenRunner(deep).generate(*args(enc), max_new_tokens=STEPS)
    kept_all = runner.generate(*args(enc), [cut_pruner(1, False, num_tokens=1000)], max_new_tokens=STEPS)
    assert torch.equal(full.tokens, kept_all.tokens)


@torch.no_grad()
def test_split_cache_lengths_and_decoding_positions(deep):
    enc = encode(deep.config.model_type, "left")
    runner = QwenRunner(deep)
    inputs = runner.prepare(*args(enc), padding_side="left")
    cache = DynamicCache(config=runner.lm.config)
    pruner = cut_pruner(1, False)
    _, cut = runner.decoder([pruner]).prefill(inputs, "left", cache)
    full, short = inputs.embeds.shape[1], cut.index.shape[1]
    assert short < full
    assert [cache.get_seq_length(i) for i in range(TEXT_LAYERS)] == [full, full, short, short]
    for group in cut.groups:  # both halves decode at the unpruned rope_deltas under "original"
        step = group.next_token()
        assert step.position_ids.shape == (3, 3, 1)
        assert step.position_ids[:, :, 0].tolist() == [inputs.next_position.tolist()] * 3
        assert step.next_token().position_ids[0, :, 0].tolist() == (inputs.next_position + 1).tolist()


# --- (c) batch invariance -----------------------------------------------------------------------------
@pytest.mark.parametrize("two_stage,side,packed", [(False, "left", False), (True, "right", False),
                                                   (True, "left", True), (False, "right", True)],
                         ids=["llm_only-left-padded", "two_stage-right-padded", "two_stage-left-packed",
                              "llm_only-right-packed"])
@torch.no_grad()
def test_a_sample_does_not_depend_on_its_batch(deep, side, two_stage, packed):
    kind = deep.config.model_type
    runner = QwenRunner(deep, packed_prefill=packed)
    pruner = cut_pruner(1, two_stage)
    together, inputs = runner(*args(encode(kind, side)), [pruner], padding_side=side)
    gen = runner.generate(*args(encode(kind, side)), [pruner], max_new_tokens=STEPS)
    for b in range(3):
        one = encode(kind, side, slice(b, b + 1))
        assert len(image_rows(slice(b, b + 1))) == len(one["image_grid_thw"])
        alone, single = QwenRunner(deep)(*args(one), [pruner], padding_side=side)  # padded, batch of one
        assert torch.equal(single.cut.visual_counts, inputs.cut.visual_counts[b : b + 1])
        kept = inputs.cut.attention_mask[b].bool()
        torch.testing.assert_close(together[b][kept], alone[0], atol=LOGITS_ATOL, rtol=1e-6)
        assert torch.equal(gen.tokens[b], runner.generate(*args(one), [pruner], max_new_tokens=STEPS).tokens[0])
