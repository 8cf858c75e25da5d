"""The Qwen2.5-VL / Qwen3-VL table of the prefill benchmark (``prefill.py --model qwen2_5_vl``): a
random model of the 7B/8B shape or a scaled-down copy, vision pruners at fractions of the image's
merged tokens (module docstring of ``prefill.py``)."""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from prefill_pruners import qwen_skip_reason
from prefill_common import IMAGE_TOKEN, device_name, median_ratio, print_combined, timed, timed_pairs
from vlm import pruning


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
