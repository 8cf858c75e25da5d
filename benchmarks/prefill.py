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
* scoring % (LLM-stage pruners): the time spent scoring inside the cut run at the row's budget,
  measured directly (:class:`ScoringClock`: the probe, the key re-projection, ``keep_stage`` /
  ``merge_stage``; median of ``--repeats`` runs), same units; the same inside the keep-all run (every
  cut at full length, the worst case) is printed once per pruner. The overhead column's difference of
  two whole prefills also holds the layer-group setup and re-padding at each cut;
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

On CPU the script first sets the allocator steady (``steady_allocator``: glibc keeps freed memory
for reuse instead of mapping every large tensor afresh; ``--system-malloc`` keeps the defaults).
With the defaults, page faults made a prefill's time depend on how much memory a code path keeps
alive: the layer-by-layer cut decoder, which keeps a KV cache of its scored layers, read 10-14 %
slower than ``self.lm``'s prefill while doing the same work (< 0.3 % with the setting).

Times are medians over ``--repeats``. Every speed-up and every overhead compares two runs timed
alternately (:func:`timed_pairs`), so that drift in the machine's speed hits both sides alike, and is
the median of the within-pair ratios (differences for overheads), not a ratio of medians; the ms
printed beside a speed-up are the medians of the same pairs. (``--anyres`` and ``--packed`` still
print a ratio of paired medians.) On a shared CPU pass ``--threads 1``: a multi-threaded op stalls
whenever another process holds a core. ``--model qwen*`` runs the vision pruners that run on merge
units and skips the others with the reason printed.

The script's pieces sit beside it: ``prefill_common.py`` (timing, the combined table),
``prefill_pruners.py`` (each pruner at a budget on the benchmark's model, and keeping all) and
``prefill_qwen.py`` (the Qwen table).

Usage: python benchmarks/prefill.py --size small --pruner vtc_cls --repeats 5
       python benchmarks/prefill.py --size small --threads 1 --repeats 7 --all
       python benchmarks/prefill.py --size small --anyres --repeats 3
       python benchmarks/prefill.py --size small --packed --batch 4 --repeats 5
       python benchmarks/prefill.py --model qwen2_5_vl --size small --pruner flowcut --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark's own modules, beside it

# the Qwen sizes, FLOP model and combined-table header are re-exported: the script's tests read them here
from prefill_pruners import ScoringClock, is_llm_stage, keep_all_pruner, make_pruner  # noqa: E402
from prefill_qwen import QWEN_FRACTIONS, QWEN_SIZES, build_qwen, qwen_llm_flops, qwen_tables  # noqa: E402,F401
from prefill_common import (  # noqa: E402,F401
    COMBINED_HEADER, IMAGE_TOKEN, device_name, median_ratio, print_combined, steady_allocator, timed, timed_pair,
    timed_pairs)
from vlm import pruning  # noqa: E402
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


def scoring_seconds(runner, inputs, hooks, repeats: int, device: str) -> float:
    """Median over ``repeats`` cut prefills of ``inputs`` of the time the LLM-stage pruner among
    ``hooks`` spends scoring (:class:`ScoringClock`), after one warm-up run."""
    decoder = runner.decoder(hooks)
    clock = ScoringClock(decoder, decoder.pruner, device)
    runner.prefill(inputs, decoder, "right")
    times = []
    for _ in range(repeats):
        clock.seconds = 0.0
        runner.prefill(inputs, decoder, "right")
        times.append(clock.seconds)
    return statistics.median(times)


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
            worst = 100.0 * scoring_seconds(runner, runner.prepare(ids, pix, hooks=keep_all), keep_all,
                                            args.repeats, device) / t_e2e_full
            print(f"  {name}: scoring while keeping all (every cut at full length) {worst:.2f} % of the "
                  "unpruned end-to-end prefill", flush=True)
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
            scoring = None
            if llm_stage:
                scoring = 100.0 * scoring_seconds(runner, inputs, hooks, args.repeats, device) / t_e2e_full
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
                             ideal=llm_flops(cfg, len_full) / flops, overhead=overhead, scoring=scoring, delta=delta,
                             stage="llm" if llm_stage else "vision"))
            print(f"  {name} @ {budget}: done", flush=True)
    print(f"speed-up: median of the {args.repeats} within-pair ratios (unpruned / pruned LLM prefill, timed "
          "alternately); ms columns: medians of the same pairs; ms ratio: the ratio of those medians; overhead: "
          "scoring while keeping every token (LLM stage: all but one), minus the plain pass, median of the "
          "within-pair differences, % of the unpruned end-to-end prefill; scoring (LLM stage): the time spent "
          "scoring inside the cut run at this budget (probe, key re-projection, keep/merge; median of the runs), "
          "same units; "
          "vision Δ: the vision pass (+ projector) "
          "with the pruner at this budget minus the plain one, same units (vision pruners)")
    print_combined(rows)
    return rows


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
    ap.add_argument("--system-malloc", action="store_true",
                    help="on CPU, keep glibc's default allocator settings (default: steady_allocator(), so that "
                         "runs do not differ by page faults)")
    args = ap.parse_args(argv)
    if args.model != "llava" and (args.anyres or args.packed):
        ap.error("--anyres and --packed are LLaVA settings; a Qwen model runs the budget table only")
    if args.size == "tiny" and (args.anyres or args.packed):
        ap.error("--size tiny runs the budget table only")
    names = pruning.available() if args.all else (args.pruners or [args.pruner])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.system_malloc:
        print(f"allocator: {steady_allocator() or 'default (not glibc)'}")
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
