"""LLaVA-NeXT (anyres) through our runner: parity with transformers without pruning (packed
features, logits, greedy tokens), per-crop budgets and packing after pruning, batch/padding
invariance, per-crop kept indices against the plain formulas, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.llava.tiny import EOS, IMAGE_TOKEN, PAD, pad_batch, prompt, save_tiny_processor
from tests.pruning import plain
from vlm import pruning
from vlm.backbones import LlavaNextBackbone
from vlm.runtime.cli import parse_configs
from vlm.modules.llava_eval import LlavaEval
from vlm.towers.llava_next import LlavaNextRunner, unpad_bounds

ATOL = 1e-5
SIZES = torch.tensor([[40, 90], [100, 30], [50, 50]])  # (H, W): 1x2 grid, 2x1 grid (unpadded), 2x2 grid
TEXT = [([1, 7, 8], [9, 10, 11]), ([1, 12], [13, 14, 15, 16, 17, 18]), ([1], [19])]


def next_config(image_size: int = 32, patch_size: int = 8, vision_layers: int = 4, text_layers: int = 2) -> dict:
    """A ``LlavaNextConfig`` dict: CLIP vision (hidden 32, 4 heads) + Llama (hidden 32,
    ``text_layers`` layers, 4 query / 2 key-value heads, vocab 64), grid pinpoints of 1x2, 2x1 and
    2x2 crops."""
    s = image_size
    return dict(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=vision_layers,
            num_attention_heads=4, image_size=s, patch_size=patch_size, projection_dim=32,
        ),
        text_config=dict(
            model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=text_layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1,
            max_position_embeddings=512,
        ),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
    )


def tiny_llava_next(seed: int = 0, **kwargs):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(LlavaNextConfig(**next_config(**kwargs))).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 5, 3, 32, 32)  # crops padded to 5, as the processor returns them


def prompts(counts) -> list[list[int]]:
    return [prompt(before, after, int(n)) for (before, after), n in zip(TEXT, counts)]


def valid_rows(logits, mask):
    return [logits[i][mask[i].bool()] for i in range(logits.shape[0])]


@torch.no_grad()
def test_packed_features_equal_transformers(model, pixels):
    runner = LlavaNextRunner(model)
    visual = runner.encode_images(pixels, image_sizes=SIZES)
    ref = model.model.get_image_features(pixels, SIZES).pooler_output
    assert visual.crops_per_image.tolist() == [3, 3, 5]
    assert visual.counts.tolist() == [r.shape[0] for r in ref] == [16 + 4 * 9, 16 + 8 * 3, 16 + 8 * 9]
    assert torch.equal(visual.full_count, visual.counts)
    for i, r in enumerate(ref):
        torch.testing.assert_close(visual.features[i, : r.shape[0]], r, atol=ATOL, rtol=1e-5)
        assert visual.positions[i, : r.shape[0]].tolist() == list(range(r.shape[0]))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_forward_parity_with_transformers(model, pixels, side, packed):
    """Packed, the three samples' different visual-token counts (52, 40, 88) run with no padding."""
    runner = LlavaNextRunner(model, packed_prefill=packed)
    seqs = prompts(runner.encode_images(pixels, image_sizes=SIZES).counts)
    ids, mask = pad_batch(seqs, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=ids, pixel_values=pixels, image_sizes=SIZES, attention_mask=mask, position_ids=pos).logits
    ours, inputs = runner(ids, pixels, mask, padding_side=side, image_sizes=SIZES)
    assert torch.equal(inputs.attention_mask, mask)
    for r, o in zip(valid_rows(ref, mask), valid_rows(ours, mask)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@torch.no_grad()
def test_greedy_generation_parity(model, pixels, packed):
    runner = LlavaNextRunner(model, packed_prefill=packed)
    ids, mask = pad_batch(prompts(runner.encode_images(pixels, image_sizes=SIZES).counts), "left")
    ref = model.generate(input_ids=ids, pixel_values=pixels, image_sizes=SIZES, attention_mask=mask, do_sample=False,
                         max_new_tokens=8)
    ours = runner.generate(ids, pixels, mask, max_new_tokens=8, image_sizes=SIZES)
    assert torch.equal(ours.tokens, ref[:, ids.shape[1]:])


def expected_packed_count(runner, visual, image: int) -> int:
    """Plain count: kept base patches + kept sub-crop patches inside the unpadded window + one
    newline per window row that keeps a patch."""
    s = runner.side
    first = int(visual.crops_per_image[:image].sum())
    n = int(visual.crops_per_image[image])
    kept = [set(visual.crops.positions[first + c, : int(visual.crops.counts[first + c])].tolist()) for c in range(n)]
    r, c = runner.crop_grid(*SIZES[image].tolist())
    top, bottom, left, right = unpad_bounds(r * s, c * s, *SIZES[image].tolist())
    total = len(kept[0])
    for row in range(top, bottom):
        in_row = sum((row % s) * s + col % s in kept[1 + (row // s) * c + col // s] for col in range(left, right))
        total += in_row + (in_row > 0)
    return total


@torch.no_grad()
def test_pruned_budget_per_crop_and_packing(model, pixels):
    """Each crop keeps its budget; the packed sequence holds the kept patches inside the unpadded
    window in order. With the cut after the feature layer a kept token's features are exactly the
    unpruned token's at the same packed position."""
    runner = LlavaNextRunner(model)
    full = runner.encode_images(pixels, image_sizes=SIZES)
    visual = runner.encode_images(pixels, [pruning.create("cls_attention", num_tokens=5)], image_sizes=SIZES)
    assert visual.crops.counts.tolist() == [5] * 11
    assert torch.equal(visual.full_count, full.counts)
    for i in range(3):
        k = int(visual.counts[i])
        assert k == expected_packed_count(runner, visual, i)
        pos = visual.positions[i, :k]
        assert bool((pos[1:] > pos[:-1]).all())
        torch.testing.assert_close(visual.features[i, :k], full.features[i, pos], atol=ATOL, rtol=1e-5)


PRUNERS = [None, ("vtc_cls", dict(num_tokens=6, start_layer=0)), ("flowcut", dict(num_tokens=5))]


@pytest.mark.parametrize("spec", PRUNERS, ids=lambda s: "none" if s is None else s[0])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batch_and_padding_invariance(model, pixels, spec, side):
    hooks = [] if spec is None else [pruning.create(spec[0], **spec[1])]
    runner = LlavaNextRunner(model)
    visual = runner.encode_images(pixels, hooks, image_sizes=SIZES)
    if spec is not None:
        assert visual.crops.counts.tolist() == [spec[1]["num_tokens"]] * 11
    seqs = prompts(visual.counts)
    ids, mask = pad_batch(seqs, side)
    together, inputs = runner(ids, pixels, mask, hooks, padding_side=side, image_sizes=SIZES)
    assert torch.equal(inputs.visual_counts, visual.counts)
    left_ids, left_mask = pad_batch(seqs, "left")
    gen = runner.generate(left_ids, pixels, left_mask, hooks, max_new_tokens=4, image_sizes=SIZES)
    for i, seq in enumerate(seqs):
        one_ids, one_mask = pad_batch([seq], side)
        n = int(visual.crops_per_image[i])
        alone, _ = runner(one_ids, pixels[i : i + 1, :n], one_mask, hooks, padding_side=side, image_sizes=SIZES[i : i + 1])
        torch.testing.assert_close(together[i][inputs.attention_mask[i].bool()], alone[0], atol=ATOL, rtol=1e-5)
        one_ids, one_mask = pad_batch([seq], "left")
        one = runner.generate(one_ids, pixels[i : i + 1, :n], one_mask, hooks, max_new_tokens=4, image_sizes=SIZES[i : i + 1])
        assert torch.equal(gen.tokens[i], one.tokens[0])


CASES = [
    ("vtc_cls", dict(num_tokens=9, start_layer=-4), lambda n: plain.vtc_cls_cut(n - 4, n - 1, 9)),
    ("flowcut", dict(num_tokens=6, shared_count=False), lambda n: plain.flowcut_cut(n, 6)),
    ("cls_attention", dict(num_tokens=7), lambda n: plain.cls_attention_cut(n - 1, 7)),
]


@pytest.mark.parametrize("name,kwargs,make_cut", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_kept_indices_per_crop_match_plain_formulas(name, kwargs, make_cut):
    """8 vision blocks, 36 patches per crop (FlowCut cuts after blocks 1, 3, 5); every crop of
    every image against the plain one-image implementation."""
    model = tiny_llava_next(seed=1, image_size=48, vision_layers=8)
    runner = LlavaNextRunner(model)
    for layer in runner.vision.model.encoder.layers:  # peaked attention: FlowCut cuts early
        layer.self_attn.q_proj.weight.data *= 4
        layer.self_attn.k_proj.weight.data *= 4
    torch.manual_seed(3)
    pixels, sizes = torch.randn(2, 5, 3, 48, 48), torch.tensor([[60, 130], [90, 90]])
    visual = runner.encode_images(pixels, [pruning.create(name, **kwargs)], image_sizes=sizes)
    crops = torch.cat([pixels[0, :3], pixels[1, :5]])
    assert visual.crops_per_image.tolist() == [3, 5]
    n_blocks = runner.vision.blocks_for(runner.feature_layer)
    for c in range(crops.shape[0]):
        expected = plain.run_plain(runner.vision.model, crops[c], n_blocks, make_cut(n_blocks))
        assert visual.crops.positions[c, : int(visual.crops.counts[c])].tolist() == expected
        assert len(expected) == kwargs["num_tokens"]


@torch.no_grad()
def test_flowcut_shares_one_prune_count_per_image():
    """FlowCut's default (``shared_count``): an image's crops are cut with the maximum of their prune
    counts, as the released code does over its vision batch (``official_anyres.vision_stage``, one
    image); images never share a count, so the two images here match their separate references."""
    from tests.llava import official_anyres

    model = tiny_llava_next(seed=1, image_size=48, vision_layers=8)
    runner = LlavaNextRunner(model)
    for layer in runner.vision.model.encoder.layers:
        layer.self_attn.q_proj.weight.data *= 8
        layer.self_attn.k_proj.weight.data *= 8
    torch.manual_seed(3)
    pixels, sizes = torch.randn(2, 5, 3, 48, 48), torch.tensor([[60, 130], [90, 90]])
    visual = runner.encode_images(pixels, [pruning.create("flowcut", num_tokens=6)], image_sizes=sizes)
    own = runner.encode_images(pixels, [pruning.create("flowcut", num_tokens=6, shared_count=False)], image_sizes=sizes)
    vm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    n_blocks = runner.vision.blocks_for(runner.feature_layer)
    first, differs = 0, 0
    for image, n in enumerate(visual.crops_per_image.tolist()):
        ids, _ = official_anyres.vision_stage(vm, pixels[image, :n], n_blocks, 6)
        for c in range(n):
            got = visual.crops.positions[first + c, : int(visual.crops.counts[first + c])].tolist()
            assert got == sorted(ids[c])
            differs += own.crops.positions[first + c, :6].tolist() != got
        first += n
    assert differs > 0  # per-crop counts select other patches on this model


@torch.no_grad()
def test_original_positions_index_the_unpruned_packed_sequence(model, pixels):
    runner = LlavaNextRunner(model, position_policy="original")
    visual = runner.encode_images(pixels, [pruning.create("cls_attention", num_tokens=4)], image_sizes=SIZES)
    ids, mask = pad_batch(prompts(visual.counts), "right")
    inputs = runner.build_inputs(ids, visual, mask)
    n0, k, full = len(TEXT[1][0]), int(visual.counts[1]), int(visual.full_count[1])
    assert inputs.position_ids[1, n0 : n0 + k].tolist() == (n0 + visual.positions[1, :k]).tolist()
    assert inputs.position_ids[1, n0 + k] == n0 + full  # text resumes after the unpruned image


def test_image_sizes_are_required(model, pixels):
    ids, mask = pad_batch(prompts([52, 40, 88]), "right")
    with pytest.raises(ValueError, match="image_sizes"):
        LlavaNextRunner(model)(ids, pixels, mask)


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "llava"


@pytest.mark.parametrize("overlay", sorted((CONFIGS / "pruner").glob("*.yaml")), ids=lambda p: p.stem)
def test_next_configs_compose(overlay):
    cfg = parse_configs([CONFIGS / "llava_next_7b.yaml", overlay, CONFIGS / "data" / "pope.yaml"],
                        ["--model.init_args.pruner.init_args.num_tokens", "32"])
    init = cfg.model.init_args
    assert init.backbone.class_path == "vlm.backbones.LlavaNextBackbone"
    assert init.backbone.init_args.model == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert init.pruner.init_args.num_tokens == 32


def save_tiny_next_processor(path: Path) -> str:
    """The tiny word-level tokenizer (``<image>`` = id 5) with a 32-px anyres image processor."""
    from transformers import AutoProcessor, LlavaNextImageProcessor, LlavaNextProcessor

    tok = AutoProcessor.from_pretrained(save_tiny_processor(path / "llava")).tokenizer
    image = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(str(path / "next"))
    return str(path / "next")


@torch.no_grad()
def test_backbone_and_eval_module_answer_like_transformers(tmp_path):
    """LlavaNextBackbone's processor output (with image_sizes) goes through LlavaEval.answer; the
    placeholder runs the processor expands match our packed counts, and answers equal HF's."""
    backbone = LlavaNextBackbone(config=next_config(), processor=save_tiny_next_processor(tmp_path))
    assert isinstance(backbone.runner, LlavaNextRunner) and backbone.identity()["family"] == "llava_next"
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in [(40, 90), (100, 30)]]
    questions = ["w1 w2", "w3 w4 w5"]
    module = LlavaEval(backbone, max_new_tokens=4, prompt_template="<image> {question}")
    texts, gen = module.answer(images, questions)
    enc = backbone.encode([f"<image> {q}" for q in questions], images)
    assert gen.inputs.visual_counts.tolist() == (enc["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == [52, 40]
    ref = backbone.model.generate(**enc, do_sample=False, max_new_tokens=4)[:, enc["input_ids"].shape[1]:]
    tok = backbone.processor.tokenizer
    assert texts == [t.strip() for t in tok.batch_decode(ref, skip_special_tokens=True)]
    pruner = pruning.create("vtc_cls", num_tokens=4)
    _, gen = LlavaEval(backbone, pruner, max_new_tokens=2, prompt_template="<image> {question}").answer(images, questions)
    visual = backbone.runner.encode_images(enc["pixel_values"], [pruner], enc["image_sizes"])
    assert visual.crops.counts.tolist() == [4] * 6
    assert gen.inputs.visual_counts.tolist() == visual.counts.tolist()
