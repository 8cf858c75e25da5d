"""Prefill latency and FLOPs of a pruned LLaVA against the unpruned one, per token budget.

A randomly initialised LLaVA-shaped model (no download): ``--size real`` is LLaVA-1.5-7B's shape
(CLIP ViT-L/14-336, 576 patches, Vicuna-7B; fp16, needs a GPU), ``--size small`` a scaled-down
copy for CPUs. Budgets are fractions 192/576, 128/576, 64/576 of the patches. Reported per budget:

* LLM prefill time and FLOPs (the pruned stage), the actual speed-up, the FLOP-proportional ideal
  and their ratio (target >= 0.9);
* pruning overhead: vision pass with the pruner scoring but keeping every token, minus the plain
  vision pass, as a percentage of the unpruned prefill (target < 3 %);
* end-to-end prefill (vision + projector + LLM) before and after.

FLOPs count multiply-adds x 2 of the decoder's linear layers and attention (QK^T and PV) at
sequence length L; norms, activations and rotary embeddings are ignored.

Usage: python benchmarks/prefill.py --size small --pruner vtc_cls --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from vlm import pruning
from vlm.towers.llava import LlavaRunner

SIZES: dict[str, dict[str, Any]] = {
    "real": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14),
                 text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064), text_tokens=64),
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=8,
                              image_size=336, patch_size=14),
                  text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=1000), text_tokens=64),
}
IMAGE_TOKEN = 3


def build(size: str, dtype: torch.dtype, device: str):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    s = SIZES[size]
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", projection_dim=s["vision"]["hidden_size"], **s["vision"]),
        text_config=dict(model_type="llama", max_position_embeddings=4096, pad_token_id=0, **s["text"]),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return model, cfg


def llm_flops(cfg, length: int) -> float:
    t = cfg.text_config
    d, f, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = d * t.num_key_value_heads // t.num_attention_heads
    linear = 2 * length * (2 * d * d + 2 * d * kv + 3 * d * f)
    attention = 2 * 2 * length * length * d / 2  # causal: half of QK^T and PV
    return layers * (linear + attention) + 2 * length * d * t.vocab_size / length  # lm_head on the last token


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


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--pruner", default="vtc_cls", choices=pruning.available())
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model, cfg = build(args.size, dtype, device)
    runner = LlavaRunner(model)
    n_patch = cfg.image_seq_length
    text = SIZES[args.size]["text_tokens"]
    ids = torch.randint(10, 900, (args.batch, text), device=device)
    ids[:, 8] = IMAGE_TOKEN  # one placeholder per sample; the runner puts the kept tokens there
    pix = torch.randn(args.batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device, dtype=dtype)

    def lm(inputs):
        return lambda: runner.lm(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                                 position_ids=inputs.position_ids, use_cache=False)

    full_inputs = runner.prepare(ids, pix)
    t_llm_full = timed(lm(full_inputs), args.repeats, device)
    t_vis_full = timed(lambda: runner.encode_images(pix), args.repeats, device)
    t_e2e_full = timed(lambda: lm(runner.prepare(ids, pix))(), args.repeats, device)
    len_full = full_inputs.embeds.shape[1]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; size={args.size}; pruner={args.pruner}; batch={args.batch}; {n_patch} patches; "
          f"LLM sequence {len_full}; dtype {dtype}")
    print("| budget | LLM prefill ms | speed-up | FLOP ideal | ratio | LLM TFLOPs | e2e prefill ms | overhead % |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n_patch} (none) | {1e3 * t_llm_full:.1f} | 1.00 | 1.00 | - | {llm_flops(cfg, len_full) / 1e12:.3f} | "
          f"{1e3 * t_e2e_full:.1f} | - |")
    score_only = [pruning.create(args.pruner, num_tokens=n_patch)]
    t_vis_score = timed(lambda: runner.encode_images(pix, score_only), args.repeats, device)
    overhead = 100.0 * max(t_vis_score - t_vis_full, 0.0) / t_e2e_full
    for budget in (n_patch * 192 // 576, n_patch * 128 // 576, n_patch * 64 // 576):
        hooks = [pruning.create(args.pruner, num_tokens=budget)]
        inputs = runner.prepare(ids, pix, hooks=hooks)
        t_llm = timed(lm(inputs), args.repeats, device)
        t_e2e = timed(lambda: lm(runner.prepare(ids, pix, hooks=hooks))(), args.repeats, device)
        length = inputs.embeds.shape[1]
        ideal = llm_flops(cfg, len_full) / llm_flops(cfg, length)
        speed = t_llm_full / t_llm
        print(f"| {budget} | {1e3 * t_llm:.1f} | {speed:.2f} | {ideal:.2f} | {speed / ideal:.2f} | "
              f"{llm_flops(cfg, length) / 1e12:.3f} | {1e3 * t_e2e:.1f} | {overhead:.2f} |")


if __name__ == "__main__":
    main()
