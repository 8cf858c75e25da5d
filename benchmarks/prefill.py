"""Prefill latency and FLOPs of a pruned LLaVA against the unpruned one, per token budget.

A randomly initialised LLaVA-shaped model (no download): ``--size real`` is LLaVA-1.5-7B's shape
(CLIP ViT-L/14-336, 576 patches, Vicuna-7B; fp16, needs a GPU), ``--size small`` a scaled-down
copy for CPUs (``tiny``: the smallest shapes, for the script's test). Budgets are fractions 192/576,
128/576, 64/576 of the patches. ``--pruner`` takes any registered pruner; ``--pruners a b c`` or
``--all`` run several and print one combined table (:func:`llava`). A vision pruner cuts in the
vision tower; an LLM-stage one (``fastv``, ``dart``, ``flowcut_llm``, the last without its vision
stage: ``two_stage=False``) cuts after its decoder layer ``layer`` through the runner's layer-by-layer
decoder, so its pruned LLM prefill includes its scoring and the cut. Reported per pruner and budget:

* LLM prefill ms, pruned and unpruned: the medians of the *same* alternately timed pairs
  (:func:`timed_pairs`); speed-up: the median of the within-pair ratios (unpruned / pruned), with the
  ratio of the two printed medians beside it (``ms ratio``; the two differ slightly when pairs vary);
  the FLOP-proportional ideal and the ratio speed-up / ideal (target >= 0.9);
* overhead %: the pruner scoring but keeping every token, minus the plain pass, as the median of the
  within-pair differences, % of the unpruned end-to-end prefill (target < 3 %). A vision pruner: the
  vision pass (+ projector) with ``num_tokens`` = the patch count; an LLM-stage pruner: its cut prefill
  keeping all visual tokens but one (DART returns early when it keeps all; one token fewer after the
  cut is ~0.1 % of the LLM prefill) minus ``self.lm``'s plain prefill, as the ``--anyres``
  cut-overhead column. One number per pruner, repeated on its rows;
* vision delta % (vision pruners): the vision pass with the pruner at this budget minus the plain one,
  same units: the per-budget scoring and selection (DivPrune's greedy loop runs ``num_tokens``
  steps, so its keep-every-token overhead is its worst case), net of the vision blocks and projector
  work a cut inside the tower saves.

FLOPs count multiply-adds x 2 of the decoder's linear layers and attention (QK^T and PV) at
sequence length L (per layer, so an LLM-stage cut counts the layers after it at the cut length);
norms, activations and rotary embeddings are ignored.

``--anyres``: LLaVA-NeXT instead (the same tower sizes, one 672x672 image per sample = base view +
2x2 crops, 576 patches each, 2928 visual tokens with the row newlines) with FlowCut's two-stage
anyres recipe (``flowcut_llm``: T/2 patches per crop in the vision tower, then T visual tokens
after LLM layer 1) at T = 640/320/160. Its overhead columns are the LLM stage's: the scoring alone
(probe query re-projection, gathers from layer 1's keys/values, scores, top-T; timed on its own) and the whole cut machinery (a run that
scores but keeps every token, minus the plain ``self.lm`` prefill), as % of the unpruned LLM prefill.

``--packed``: the LLM prefill of a ragged batch (text lengths 1x to 4x ``text_tokens``), padded
against packed into one row (``LlavaBackbone(packed_prefill=True)``), unpruned and pruned.

``--model qwen2_5_vl|qwen3_vl``: Qwen2.5-VL-7B's / Qwen3-VL-8B's shape (``--size real``, bf16, needs
a GPU) or a scaled-down copy (``small``; ``tiny`` only checks that the script runs), one image of
24 x 32 merged tokens (real; 16 x 24 small) per sample, with a vision pruner (``--pruner``) at
1/3, 1/6 and 1/12 of the image's merged tokens (256 / 128 / 64 of 768 at the real shape). Reported per
budget (:func:`qwen`): vision tower time (the pruner's cuts included), LLM prefill time, its
speed-up over the unpruned prefill against the FLOP-proportional ideal, end-to-end prefill, and the
KV cache's bytes after the prefill against the unpruned cache's, next to the kept-token ratio; and
once, the pruning overhead (the pruner scoring in the vision tower but keeping every token, minus
the plain vision pass, as % of the unpruned end-to-end prefill) and the vision tower's attention
calls per pass (one varlen call per block: the windows of Qwen2.5-VL's windowed blocks are the
sequences of that call, not a Python loop).

Times are medians over ``--repeats``. Every speed-up and every overhead compares two runs timed
alternately (:func:`timed_pairs`), so that drift in the machine's speed hits both sides alike, and is
the median of the within-pair ratios (differences for overheads), not a ratio of medians; the ms
printed beside a speed-up are the medians of the same pairs. (``--anyres`` and ``--packed`` still
print a ratio of paired medians.) On a shared CPU pass ``--threads 1``: a multi-threaded op stalls
whenever another process holds a core. ``--model qwen*`` runs the vision pruners that run on merge
units and skips the others with the reason printed.

Usage: python benchmarks/prefill.py --size small --pruner vtc_cls --repeats 5
       python benchmarks/prefill.py --size small --threads 1 --repeats 7 --all
       python benchmarks/prefill.py --size small --anyres --repeats 3
       python benchmarks/prefill.py --size small --packed --batch 4 --repeats 5
       python benchmarks/prefill.py --model qwen2_5_vl --size small --pruner flowcut --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from vlm import pruning
from vlm.pruning.registry import PRUNERS
from vlm.towers.language_model import LayerGroup
from vlm.towers.llava import LlavaRunner
from vlm.towers.llava_next import LlavaNextRunner

SIZES: dict[str, dict[str, Any]] = {
    "real": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14),
                 text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064), text_tokens=64),
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=8,
                              image_size=336, patch_size=14),
                  text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=1000), text_tokens=64),
    # the smallest shapes that run every pruner (6 x 6 patches; 4 decoder layers: PyramidDrop's and
    # SparseVLM's three cuts each need a layer after them), for the script's test
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             image_size=84, patch_size=14),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=1000), text_tokens=16),
}
IMAGE_TOKEN = 3
ANYRES_BUDGETS = (640, 320, 160)


def build(size: str, dtype: torch.dtype, device: str, anyres: bool = False):
    import transformers

    s = SIZES[size]
    kwargs: dict[str, Any] = dict(
        vision_config=dict(model_type="clip_vision_model", projection_dim=s["vision"]["hidden_size"], **s["vision"]),
        text_config=dict(model_type="llama", max_position_embeddings=4096, pad_token_id=0, **s["text"]),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    side = s["vision"]["image_size"]
    if anyres:
        kwargs["image_grid_pinpoints"] = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
        cfg, model_cls = transformers.LlavaNextConfig(**kwargs), transformers.LlavaNextForConditionalGeneration
    else:
        kwargs["image_seq_length"] = (side // s["vision"]["patch_size"]) ** 2
        cfg, model_cls = transformers.LlavaConfig(**kwargs), transformers.LlavaForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = model_cls(cfg).to(dtype).eval()
    return model, cfg


def llm_flops(cfg, length: int, cut: tuple[int, int] | None = None,
              cuts: Sequence[tuple[int, int]] = ()) -> float:
    """Prefill FLOPs at ``length`` tokens; ``cut = (layer, cut_length)``: layers after ``layer`` run
    on ``cut_length`` tokens; ``cuts``: several such cuts in layer order (a multi-stage pruner)."""
    t = cfg.text_config
    d, f, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = d * t.num_key_value_heads // t.num_attention_heads

    def layer_flops(n: int) -> float:
        linear = 2 * n * (2 * d * d + 2 * d * kv + 3 * d * f)
        attention = 2 * 2 * n * n * d / 2  # causal: half of QK^T and PV
        return linear + attention

    stages = [(-1, length), *([cut] if cut is not None else []), *cuts]
    bounds = [layer + 1 for layer, _ in stages] + [layers]
    total = sum((b - a) * layer_flops(n) for (_, n), a, b in zip(stages, bounds, bounds[1:]))
    return total + 2 * d * t.vocab_size  # lm_head on the last token


def timed(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_pairs(a: Callable[[], Any], b: Callable[[], Any], repeats: int, device: str) -> tuple[list[float], list[float]]:
    """Times of ``a`` and ``b`` run alternately, ``repeats`` pairs (each after one warm-up call), so
    that drift in the machine's speed (other jobs, clock changes) hits both sides of a pair alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, 1, device))
        tb.append(timed(b, 1, device))
    return ta, tb


def timed_pair(a: Callable[[], Any], b: Callable[[], Any], repeats: int, device: str) -> tuple[float, float]:
    """Median times of ``a`` and ``b`` run alternately (:func:`timed_pairs`): for overheads, which
    are small differences."""
    ta, tb = timed_pairs(a, b, repeats, device)
    return statistics.median(ta), statistics.median(tb)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


@torch.no_grad()
def anyres(args, device: str, dtype: torch.dtype) -> None:
    """FlowCut's two-stage anyres cut on a LLaVA-NeXT-shaped model (module docstring)."""
    model, cfg = build(args.size, dtype, device, anyres=True)
    runner = LlavaNextRunner(model)
    side = cfg.vision_config.image_size
    sizes = torch.tensor([[2 * side, 2 * side]] * args.batch, device=device)
    pix = torch.randn(args.batch, 5, 3, side, side, device=device, dtype=dtype)
    n_visual = int(runner.encode_images(pix[:1], image_sizes=sizes[:1]).counts[0])
    text = SIZES[args.size]["text_tokens"]
    ids = torch.randint(10, 900, (args.batch, text + n_visual - 1), device=device)
    ids[:, 8 : 8 + n_visual] = IMAGE_TOKEN  # the processor's expanded placeholder run

    def lm(inputs, hooks=None):
        decoder = runner.decoder(hooks)
        return lambda: runner.prefill(inputs, decoder, "right")

    full = runner.prepare(ids, pix, image_sizes=sizes)
    length = full.embeds.shape[1]
    t_e2e_full = timed(lambda: lm(runner.prepare(ids, pix, image_sizes=sizes))(), args.repeats, device)
    keep_all = [pruning.create("flowcut_llm", num_tokens=n_visual)]
    t_llm_full, t_keep_all = timed_pair(lm(full), lm(full, keep_all), args.repeats, device)
    print(f"device: {device_name(device)}; size={args.size}; LLaVA-NeXT anyres, 5 crops x {cfg.vision_config.image_size}px; "
          f"batch={args.batch}; {n_visual} visual tokens; LLM sequence {length}; dtype {dtype}")
    print("| T (crop T/2) | visual after vision / LLM cut | LLM prefill ms | speed-up | FLOP ideal | ratio | "
          "LLM TFLOPs | e2e prefill ms | scoring % | cut overhead % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| none | {n_visual} / {n_visual} | {1e3 * t_llm_full:.1f} | 1.00 | 1.00 | - | "
          f"{llm_flops(cfg, length) / 1e12:.3f} | {1e3 * t_e2e_full:.1f} | - | - |")
    cut_overhead = 100.0 * max(t_keep_all - t_llm_full, 0.0) / t_llm_full
    for budget in ANYRES_BUDGETS:
        pruner = pruning.create("flowcut_llm", num_tokens=budget, crop_tokens=budget // 2)
        inputs = runner.prepare(ids, pix, hooks=[pruner], image_sizes=sizes)
        t_base, t_llm = timed_pair(lm(full), lm(inputs, [pruner]), args.repeats, device)  # speed-up from one pair
        t_e2e = timed(lambda: lm(runner.prepare(ids, pix, hooks=[pruner], image_sizes=sizes), [pruner])(),
                      args.repeats, device)
        _, after = lm(inputs, [pruner])()
        cut = (pruner.layer, after.cut.index.shape[1])
        decoder = runner.decoder([pruner])
        group = LayerGroup(range(0, pruner.layer + 1), inputs.attention_mask, inputs.position_ids)
        _, rope = decoder.context(group, inputs.embeds, None)
        tc, n0 = model.config.text_config, inputs.embeds.shape[1]
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        kv_shape = (args.batch, tc.num_key_value_heads, n0, head_dim)
        keys, values = torch.randn(kv_shape, device=device, dtype=dtype), torch.randn(kv_shape, device=device, dtype=dtype)

        def score() -> None:  # on the embeddings and stand-in keys/values: the same shapes and work as at layer 1
            probe, _ = decoder.probe(inputs.embeds, rope, keys, values, inputs.visual_mask, inputs.probe_index)
            pruner.keep(probe)

        t_score = timed(score, args.repeats, device)
        ideal = llm_flops(cfg, length) / llm_flops(cfg, n0, cut)
        speed = t_base / t_llm
        print(f"| {budget} ({budget // 2}) | {int(inputs.visual_counts[0])} / {int(after.cut.visual_counts[0])} | "
              f"{1e3 * t_llm:.1f} | {speed:.2f} | {ideal:.2f} | {speed / ideal:.2f} | "
              f"{llm_flops(cfg, n0, cut) / 1e12:.3f} | {1e3 * t_e2e:.1f} | {100.0 * t_score / t_llm_full:.2f} | "
              f"{cut_overhead:.2f} |")


@torch.no_grad()
def packed(args, device: str, dtype: torch.dtype) -> None:
    """Padded against packed LLM prefill (``vlm.towers.packed_prefill``) on a ragged batch: sample i
    has ``text_tokens * (1 + 3 i / (B - 1))`` text tokens around its image (1x to 4x), unpruned and
    at the 64/576 budget of ``--pruner``. FLOP ideal: padded FLOPs (B x the longest) over packed."""
    model, cfg = build(args.size, dtype, device)
    padded_runner, packed_runner = LlavaRunner(model), LlavaRunner(model, packed_prefill=True)
    text, b = SIZES[args.size]["text_tokens"], max(args.batch, 2)
    lengths = [text + (3 * text * i) // (b - 1) for i in range(b)]
    seqs = [torch.randint(10, 900, (n,)) for n in lengths]
    for s in seqs:
        s[8] = IMAGE_TOKEN
    ids = torch.zeros(b, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    ids, mask = ids.to(device), mask.to(device)
    pix = torch.randn(b, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device, dtype=dtype)
    print(f"device: {device_name(device)}; size={args.size}; batch={b}; text tokens {lengths}; dtype {dtype}; "
          f"attention backend of the packed run: vlm.kernels varlen ({'Triton' if device == 'cuda' else 'per sample'})")
    print("| budget | padded tokens | packed tokens | padded ms | packed ms | speed-up | FLOP ideal | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    n_patch = cfg.image_seq_length
    for budget in (n_patch, n_patch * 64 // 576):
        hooks = [] if budget == n_patch else [pruning.create(args.pruner, num_tokens=budget)]
        inputs = padded_runner.prepare(ids, pix, mask, hooks)
        valid = inputs.attention_mask.bool()
        t_pad, t_pack = timed_pair(lambda: padded_runner.prefill(inputs, None, "right"),
                                   lambda: packed_runner.prefill(inputs, None, "right"), args.repeats, device)
        diff = (padded_runner.prefill(inputs, None, "right")[0] - packed_runner.prefill(inputs, None, "right")[0])[valid]
        counts = valid.sum(1).tolist()
        ideal = b * llm_flops(cfg, max(counts)) / sum(llm_flops(cfg, n) for n in counts)
        print(f"| {budget}{' (none)' if budget == n_patch else ''} | {valid.numel()} | {sum(counts)} | "
              f"{1e3 * t_pad:.1f} | {1e3 * t_pack:.1f} | {t_pad / t_pack:.2f} | {ideal:.2f} | "
              f"{diff.abs().max().item():.1e} |")


# --- Qwen2.5-VL / Qwen3-VL ------------------------------------------------------------------------
#: vision tower, language model and image (merged tokens h' x w') per model and size. ``real``: the
#: 7B / 8B checkpoints' config.json; ``small``: a scaled-down copy for CPUs; ``tiny``: the smallest
#: shapes that exercise everything (windows, full-attention blocks, DeepStack), for the script's test.
QWEN_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_5_vl": {
        "real": dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                 patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
                     text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, mrope_section=[16, 24, 24], rope_theta=1e6),
                     units=(24, 32), text_tokens=64),
        "small": dict(vision=dict(depth=8, hidden_size=192, intermediate_size=512, num_heads=3, out_hidden_size=512,
                                  patch_size=14, window_size=112, fullatt_block_indexes=[3, 7]),
                      text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=2, vocab_size=1000, mrope_section=[8, 12, 12], rope_theta=1e6),
                      units=(16, 24), text_tokens=32),
        "tiny": dict(vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                                 patch_size=14, window_size=56, fullatt_block_indexes=[1]),
                     text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=1000, mrope_section=[2, 3, 3], rope_theta=1e4),
                     units=(4, 6), text_tokens=16),
    },
    "qwen3_vl": {
        "real": dict(vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                                 patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
                     text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, mrope_section=[24, 20, 20],
                               rope_theta=5e6),
                     units=(24, 32), text_tokens=64),
        "small": dict(vision=dict(depth=8, hidden_size=192, intermediate_size=512, num_heads=3, out_hidden_size=512,
                                  patch_size=16, num_position_embeddings=256, deepstack_visual_indexes=[1, 3, 5]),
                      text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=64, vocab_size=1000, mrope_section=[8, 12, 12],
                                rope_theta=5e6),
                      units=(16, 24), text_tokens=32),
        "tiny": dict(vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                                 patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                     text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, vocab_size=1000, mrope_section=[2, 3, 3],
                               rope_theta=5e6),
                     units=(4, 6), text_tokens=16),
    },
}
QWEN_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}
QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=4, vision_end_token_id=5, video_token_id=6)
#: budgets as fractions of the image's merged tokens (256 / 128 / 64 of 768 at the real shape)
QWEN_FRACTIONS = (3, 6, 12)


def build_qwen(name: str, size: str, dtype: torch.dtype, device: str):
    """A random Qwen2.5-VL / Qwen3-VL of ``QWEN_SIZES[name][size]`` (SDPA), and its config."""
    import transformers

    s = QWEN_SIZES[name][size]
    text = dict(s["text"])
    rope = {"rope_type": "default", "mrope_section": text.pop("mrope_section"), "rope_theta": text.pop("rope_theta")}
    if name == "qwen3_vl":
        rope["mrope_interleaved"] = True
    vision = dict(spatial_merge_size=2, temporal_patch_size=2, **s["vision"])
    text.update(max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope)
    config_name, model_name = QWEN_CLASSES[name]
    cfg = getattr(transformers, config_name)(vision_config=vision, text_config=text, **QWEN_TOKENS)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = getattr(transformers, model_name)(cfg).to(dtype).eval()
    return model, cfg


def qwen_llm_flops(cfg, length: int) -> float:
    """Prefill FLOPs of the Qwen language model at ``length`` tokens (multiply-adds x 2 of the
    linear layers, QK^T and PV with the causal half; lm_head on the last token)."""
    t = cfg.text_config
    d, f, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    hd = getattr(t, "head_dim", None) or d // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    linear = 2 * length * (2 * d * q + 2 * d * kv + 3 * d * f)
    attention = 2 * 2 * length * length * q / 2
    return layers * (linear + attention) + 2 * d * t.vocab_size


def cache_bytes(cache) -> int:
    """Bytes of every layer's keys and values in a transformers cache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


@contextmanager
def attention_calls() -> Iterator[list[int]]:
    """Record, for every ``vlm.kernels.attention`` call of the Qwen vision tower, the number of
    sequences (windows or frames) it packs."""
    from vlm.towers import qwen_vision

    calls: list[int] = []
    real = qwen_vision.attention

    def spy(q, k, v, spec):
        calls.append(int(spec.cu_seqlens_q.numel()) - 1 if spec.cu_seqlens_q is not None else q.shape[0])
        return real(q, k, v, spec)

    qwen_vision.attention = spy
    try:
        yield calls
    finally:
        qwen_vision.attention = real


def median_ratio(num: list[float], den: list[float]) -> float:
    """The median of the within-pair ratios ``num[i] / den[i]``."""
    return statistics.median(a / b for a, b in zip(num, den))


@torch.no_grad()
def qwen(args, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The Qwen table (module docstring); returns its rows (dicts) after printing it."""
    from transformers import DynamicCache

    from vlm.towers.qwen import QwenRunner

    model, cfg = build_qwen(args.model, args.size, dtype, device)
    runner = QwenRunner(model)
    s = QWEN_SIZES[args.model][args.size]
    v = cfg.vision_config
    hu, wu = s["units"]
    m = v.spatial_merge_size
    n_units, patches = hu * wu, hu * wu * m * m
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pix = torch.randn(args.batch * patches, dim, device=device, dtype=dtype)
    grid = torch.tensor([[1, hu * m, wu * m]] * args.batch, device=device)
    text = s["text_tokens"]
    ids = torch.randint(10, cfg.text_config.vocab_size, (args.batch, text + n_units), device=device)
    ids[:, 8 : 8 + n_units] = IMAGE_TOKEN  # the processor's placeholder run, one per sample

    def vision(hooks):
        return lambda: runner.encode_images(pix, grid, hooks)

    def prefill(inputs, cache):
        """The language model's own forward over the assembled inputs, filling ``cache`` (as
        generation does; vision pruners leave the LLM untouched)."""
        return runner.lm(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids, cache=cache, use_cache=True,
                         **runner.deepstack_kwargs(inputs))

    def lm(inputs):
        return lambda: prefill(inputs, DynamicCache(config=runner.lm.config))

    def e2e(hooks):
        return lambda: lm(runner.prepare(ids, pix, grid, hooks=hooks))()

    def kv_bytes(inputs) -> int:
        cache = DynamicCache(config=runner.lm.config)
        prefill(inputs, cache)
        return cache_bytes(cache)

    with attention_calls() as calls:
        full = runner.prepare(ids, pix, grid)
    len_full = full.embeds.shape[1]
    kv_full = kv_bytes(full)
    keep_all = [pruning.create(args.pruner, num_tokens=n_units)]
    plain, scored = timed_pairs(vision([]), vision(keep_all), args.repeats, device)
    t_e2e_full = timed(e2e([]), args.repeats, device)
    overhead = 100.0 * statistics.median(b - a for a, b in zip(plain, scored)) / t_e2e_full
    print(f"device: {device_name(device)}; model={args.model} size={args.size}; pruner={args.pruner}; "
          f"batch={args.batch}; image {hu}x{wu} = {n_units} merged tokens ({patches} patches); "
          f"text {text} tokens; LLM sequence {len_full}; dtype {dtype}")
    print(f"vision tower attention: {len(calls)} vlm.kernels.attention calls for {len(runner.vision.blocks)} blocks "
          f"(sequences per call: {calls}); pruning overhead (scoring, keeping all {n_units}): "
          f"{overhead:.2f} % of the unpruned prefill ({1e3 * t_e2e_full:.1f} ms)")
    print("| budget (merged/img) | kept % | LLM seq | vision ms | vision speed-up | LLM prefill ms (pruned / unpruned, "
          "same pairs) | LLM speed-up (median of pair ratios) | "
          "FLOP ideal | ratio | e2e ms | e2e speed-up | KV MiB | KV / unpruned | tokens / unpruned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    t_llm_full = timed(lm(full), args.repeats, device)
    rows = [dict(budget=n_units, length=len_full, kv=kv_full, speedup=1.0, ideal=1.0, calls=len(calls),
                 overhead=overhead)]
    print(f"| {n_units} (none) | 100.0 | {len_full} | {1e3 * statistics.median(plain):.1f} | 1.00 | {1e3 * t_llm_full:.1f} | "
          f"1.00 | 1.00 | - | {1e3 * t_e2e_full:.1f} | 1.00 | {kv_full / 2**20:.2f} | 1.000 | 1.000 |")
    for frac in QWEN_FRACTIONS:
        budget = max(n_units // frac, 1)
        hooks = [pruning.create(args.pruner, num_tokens=budget)]
        with attention_calls() as pruned_calls:
            inputs = runner.prepare(ids, pix, grid, hooks=hooks)
        length = inputs.embeds.shape[1]
        vis_base, vis_pruned = timed_pairs(vision([]), vision(hooks), args.repeats, device)
        llm_base, llm_pruned = timed_pairs(lm(full), lm(inputs), args.repeats, device)
        e2e_base, e2e_pruned = timed_pairs(e2e([]), e2e(hooks), args.repeats, device)
        speed = median_ratio(llm_base, llm_pruned)
        ideal = qwen_llm_flops(cfg, len_full) / qwen_llm_flops(cfg, length)
        kv = kv_bytes(inputs)
        rows.append(dict(budget=budget, length=length, kv=kv, speedup=speed, ideal=ideal, calls=len(pruned_calls),
                         kept=int(inputs.visual_counts[0]), llm_ms=1e3 * statistics.median(llm_pruned),
                         base_ms=1e3 * statistics.median(llm_base), overhead=overhead,
                         delta=100.0 * statistics.median(b - a for a, b in zip(vis_base, vis_pruned)) / t_e2e_full))
        print(f"| {budget} | {100.0 * budget / n_units:.1f} | {length} | {1e3 * statistics.median(vis_pruned):.1f} | "
              f"{median_ratio(vis_base, vis_pruned):.2f} | {1e3 * statistics.median(llm_pruned):.1f} / "
              f"{1e3 * statistics.median(llm_base):.1f} | {speed:.2f} | "
              f"{ideal:.2f} | {speed / ideal:.2f} | {1e3 * statistics.median(e2e_pruned):.1f} | "
              f"{median_ratio(e2e_base, e2e_pruned):.2f} | {kv / 2**20:.2f} | {kv / kv_full:.3f} | {length / len_full:.3f} |")
    return rows


def is_llm_stage(name: str) -> bool:
    """Whether the registered pruner ``name`` cuts inside the LLM (an :class:`LlmTokenPruner`)."""
    from vlm.pruning.llm import LlmTokenPruner

    return issubclass(PRUNERS.get(name), LlmTokenPruner)


def scaled_layers(released: Sequence[int], num_layers: int, of: int = 32) -> tuple[int, ...]:
    """A released layer schedule for ``of`` (LLaVA-1.5's 32) decoder layers, moved proportionally to
    a ``num_layers`` model (strictly increasing, each at least the previous + 1)."""
    out: list[int] = []
    for layer in released:
        out.append(max(round(layer * num_layers / of), out[-1] + 1 if out else 0))
    return tuple(out)


def pyramiddrop_args(budget: int, n_patch: int, num_layers: int) -> dict[str, Any]:
    """PyramidDrop at a layer-average ``budget``: the released stage split (8/16/24 of 32) scaled to
    the model, ratios solved for the budget; a ValueError (the row is skipped) when the first stage
    alone averages more than the budget."""
    return dict(num_tokens=budget, layers=scaled_layers((8, 16, 24), num_layers),
                num_layers=num_layers, reference_tokens=n_patch)


def sparsevlm_args(budget: int, n_patch: int, num_layers: int) -> dict[str, Any]:
    """SparseVLM at ``budget``: the released per-layer keep counts of the 576-token budget
    ``budget * 576 / n_patch``, scaled to ``n_patch``, at the released layers (2/6/15 of 32) scaled
    to the model."""
    from vlm.pruning.sparsevlm import RELEASED_COUNTS, RELEASED_LAYERS

    counts = RELEASED_COUNTS[round(budget * 576 / n_patch)]
    return dict(num_tokens=budget, layers=scaled_layers(RELEASED_LAYERS, num_layers),
                counts=tuple(max(1, round(c * n_patch / 576)) for c in counts))


#: pruners whose constructor needs more than ``num_tokens`` on the benchmark model:
#: ``name -> (budget, patches, decoder layers) -> kwargs``
BENCH_ARGS: dict[str, Callable[[int, int, int], dict[str, Any]]] = {
    "flowcut_llm": lambda budget, n, layers: dict(num_tokens=budget, two_stage=False),
    "pyramiddrop": pyramiddrop_args,
    "sparsevlm": sparsevlm_args,
}

#: keep-all-but-one settings of the multi-cut pruners (every cut scores; the first drops one token)
KEEP_ALL_ARGS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "pyramiddrop": lambda n, layers: dict(layers=scaled_layers((8, 16, 24), layers),
                                          ratios=((n - 0.5) / n,) * 3),
    "sparsevlm": lambda n, layers: dict(num_tokens=n - 1, counts=(n - 1,) * 3,
                                        layers=scaled_layers((2, 6, 15), layers)),
}


def make_pruner(name: str, num_tokens: int, n_patch: int = 576, num_layers: int = 32):
    """``name`` at ``num_tokens`` on a model of ``n_patch`` patches and ``num_layers`` decoder layers
    (:data:`BENCH_ARGS`): ``flowcut_llm`` without its vision stage (on LLaVA-1.5's single view the
    vision stage would keep T/2 patches and leave the LLM cut nothing to do); PyramidDrop and
    SparseVLM with their released schedules scaled to the model."""
    args = BENCH_ARGS.get(name, lambda budget, n, layers: dict(num_tokens=budget))(num_tokens, n_patch, num_layers)
    return pruning.create(name, **args)


def keep_all_pruner(name: str, n_patch: int, num_layers: int):
    """``name`` scoring every visual token but keeping all (LLM stage: all but one at its first cut,
    since DART returns early when it keeps all), for the overhead column."""
    if not is_llm_stage(name):
        return make_pruner(name, n_patch, n_patch, num_layers)
    if name in KEEP_ALL_ARGS:
        return pruning.create(name, **KEEP_ALL_ARGS[name](n_patch, num_layers))
    return make_pruner(name, n_patch - 1, n_patch, num_layers)


def qwen_skip_reason(name: str) -> Optional[str]:
    """Why ``name`` is not in the Qwen table (None: it is)."""
    if is_llm_stage(name):
        return "an LLM-stage pruner; the Qwen table times vision pruners (the Qwen LLM cut: tests/pruning/test_fastv_dart.py)"
    if not getattr(PRUNERS.get(name), "runs_on_merge_units", True):
        return "declares runs_on_merge_units = False (needs a CLS row or the patch grid, which Qwen's towers lack)"
    return None


COMBINED_HEADER = ("| method | budget | LLM prefill ms | unpruned ms | speed-up | ms ratio | FLOP ideal | ratio | "
                   "overhead % | vision Δ % |")


def print_combined(rows: list[dict[str, Any]]) -> None:
    """One markdown table over every pruner's budget rows (:func:`llava` / :func:`qwen` rows)."""
    print(COMBINED_HEADER)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        delta = "-" if r.get("delta") is None else f"{r['delta']:.2f}"
        print(f"| {r['method']} | {r['budget']} | {r['llm_ms']:.1f} | {r['base_ms']:.1f} | {r['speedup']:.2f} | "
              f"{r['base_ms'] / r['llm_ms']:.2f} | {r['ideal']:.2f} | {r['speedup'] / r['ideal']:.2f} | "
              f"{r['overhead']:.2f} | {delta} |")


@torch.no_grad()
def llava(args, device: str, dtype: torch.dtype, names: list[str]) -> list[dict[str, Any]]:
    """The LLaVA-1.5 budget table of every pruner in ``names`` (module docstring); returns its rows."""
    model, cfg = build(args.size, dtype, device)
    runner = LlavaRunner(model)
    n_patch = cfg.image_seq_length
    text = SIZES[args.size]["text_tokens"]
    ids = torch.randint(10, 900, (args.batch, text), device=device)
    ids[:, 8] = IMAGE_TOKEN  # one placeholder per sample; the runner puts the kept tokens there
    pix = torch.randn(args.batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device, dtype=dtype)

    def lm(inputs, hooks=None):
        """The LLM prefill over ``inputs``: ``self.lm``'s own forward, or the layer-by-layer cut
        (:class:`CutDecoder`) when an LLM-stage pruner is among ``hooks``."""
        decoder = runner.decoder(hooks)
        return lambda: runner.prefill(inputs, decoder, "right")

    def vision(hooks):
        return lambda: runner.encode_images(pix, hooks)

    full = runner.prepare(ids, pix)
    len_full = full.embeds.shape[1]
    t_e2e_full = timed(lambda: lm(runner.prepare(ids, pix))(), args.repeats, device)
    print(f"device: {device_name(device)}; size={args.size}; batch={args.batch}; {n_patch} patches; LLM sequence "
          f"{len_full} ({llm_flops(cfg, len_full) / 1e12:.3f} TFLOPs); unpruned end-to-end prefill "
          f"{1e3 * t_e2e_full:.1f} ms; dtype {dtype}; {args.repeats} pairs per timing")
    rows: list[dict[str, Any]] = []
    for name in names:
        llm_stage = is_llm_stage(name)
        layers = cfg.text_config.num_hidden_layers
        keep_all = [keep_all_pruner(name, n_patch, layers)]
        if llm_stage:  # one token fewer after the cut is ~0.1 % of the LLM prefill
            plain, scored = timed_pairs(lm(full), lm(runner.prepare(ids, pix, hooks=keep_all), keep_all),
                                        args.repeats, device)
        else:
            plain, scored = timed_pairs(vision([]), vision(keep_all), args.repeats, device)
        overhead = 100.0 * statistics.median(b - a for a, b in zip(plain, scored)) / t_e2e_full
        for budget in (n_patch * 192 // 576, n_patch * 128 // 576, n_patch * 64 // 576):
            try:
                hooks = [make_pruner(name, budget, n_patch, layers)]
            except ValueError as err:  # e.g. PyramidDrop's first stage alone averages more than the budget
                print(f"  {name} @ {budget}: skipped ({err})", flush=True)
                continue
            inputs = runner.prepare(ids, pix, hooks=hooks)
            base, pruned = timed_pairs(lm(full), lm(inputs, hooks), args.repeats, device)
            length = inputs.embeds.shape[1]
            if llm_stage:
                _, after = lm(inputs, hooks)()
                n_vis = int(inputs.visual_counts[0])
                stage_lengths = [length - n_vis + int(c[0]) for c in after.cut.stage_visual_counts]
                kept = int(after.cut.visual_counts[0])
                flops = llm_flops(cfg, length, cuts=list(zip(after.cut.layers, stage_lengths)))
                delta = None
            else:
                kept = int(inputs.visual_counts[0])
                flops = llm_flops(cfg, length)
                v_plain, v_pruned = timed_pairs(vision([]), vision(hooks), args.repeats, device)
                delta = 100.0 * statistics.median(b - a for a, b in zip(v_plain, v_pruned)) / t_e2e_full
            rows.append(dict(method=name, budget=budget, kept=kept, llm_ms=1e3 * statistics.median(pruned),
                             base_ms=1e3 * statistics.median(base), speedup=median_ratio(base, pruned),
                             ideal=llm_flops(cfg, len_full) / flops, overhead=overhead, delta=delta,
                             stage="llm" if llm_stage else "vision"))
            print(f"  {name} @ {budget}: done", flush=True)
    print(f"speed-up: median of the {args.repeats} within-pair ratios (unpruned / pruned LLM prefill, timed "
          "alternately); ms columns: medians of the same pairs; ms ratio: the ratio of those medians; overhead: "
          "scoring while keeping every token (LLM stage: all but one), minus the plain pass, median of the "
          "within-pair differences, % of the unpruned end-to-end prefill; vision Δ: the vision pass (+ projector) "
          "with the pruner at this budget minus the plain one, same units (vision pruners)")
    print_combined(rows)
    return rows


def qwen_tables(args, device: str, dtype: torch.dtype, names: list[str], several: bool):
    """The Qwen table (:func:`qwen`) of each pruner in ``names`` that runs on merge units (the others
    are skipped with the reason printed) and, with ``several``, one combined table. Returns the rows
    of a single pruner's table (``several`` False), else ``{name: rows}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        reason = qwen_skip_reason(name)
        if reason is not None:
            print(f"skipped {name}: {reason}")
            continue
        out[name] = qwen(argparse.Namespace(**{**vars(args), "pruner": name}), device, dtype)
    if not several:
        return out.get(names[0], [])
    print("speed-up: median of the within-pair ratios (unpruned / pruned LLM prefill, timed alternately); ms "
          "columns: medians of the same pairs; ms ratio: the ratio of those medians; overhead: scoring while keeping "
          "every token minus the plain vision pass, % of the unpruned end-to-end prefill; vision Δ: the vision pass "
          "with the pruner at this budget minus the plain one, same units")
    print_combined([dict(r, method=name) for name, rows in out.items() for r in rows[1:]])
    return out


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> Optional[list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["llava", *QWEN_SIZES], default="llava",
                    help="LLaVA-1.5 (default; --anyres: LLaVA-NeXT) or a Qwen model (module docstring)")
    ap.add_argument("--size", choices=["real", "small", "tiny"], default="small",
                    help="real: the 7B/8B shape (GPU); small: scaled down for CPUs; tiny: runs in seconds (tests)")
    ap.add_argument("--pruner", default="vtc_cls", choices=pruning.available())
    ap.add_argument("--pruners", nargs="+", choices=pruning.available(), default=None,
                    help="several pruners, one combined table (overrides --pruner)")
    ap.add_argument("--all", action="store_true",
                    help="every registered pruner the model runs (Qwen: those on merge units; the others are "
                         "skipped with the reason printed)")
    ap.add_argument("--anyres", action="store_true", help="LLaVA-NeXT with FlowCut's two-stage cut (--pruner unused)")
    ap.add_argument("--packed", action="store_true",
                    help="padded against packed LLM prefill on a ragged batch (--batch samples, at least 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: torch's). On a shared machine use 1: a multi-threaded op stalls "
                         "whenever another process holds one of its cores")
    args = ap.parse_args(argv)
    if args.model != "llava" and (args.anyres or args.packed):
        ap.error("--anyres and --packed are LLaVA settings; a Qwen model runs the budget table only")
    if args.size == "tiny" and (args.anyres or args.packed):
        ap.error("--size tiny runs the budget table only")
    names = pruning.available() if args.all else (args.pruners or [args.pruner])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model != "llava":
        return qwen_tables(args, device, torch.bfloat16 if device == "cuda" else torch.float32, names,
                           several=args.all or args.pruners is not None)
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.anyres:
        anyres(args, device, dtype)
        return
    if args.packed:
        packed(args, device, dtype)
        return
    return llava(args, device, dtype, names)


if __name__ == "__main__":
    main()
