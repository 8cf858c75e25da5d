"""Attention benchmark: the fused Triton kernel vs SDPA (dense mask), compiled FlexAttention and the reference.

Usage::

    python benchmarks/attention.py            # GPU: every backend, forward and forward+backward
    python benchmarks/attention.py --cpu      # CPU: reference and SDPA forward only, small batch

Throughput counts only unmasked work. For a (batch, head) with ``A`` pairs in the denominator
set and ``W`` pairs with a non-zero final weight, the forward costs ``2 d A`` (``q k^T``) plus
``2 d W`` (``P V``) FLOPs; forward+backward counts 3.5x the forward (FlashAttention convention:
backward = 2.5x forward). Masks of the SDPA path are built before timing; SDPA cannot express
``all_keys`` (TCPA), so its TCPA line runs the renormalised variant and is marked ``≈``.
FlexAttention runs compiled (``torch.compile(flex_attention)``) with a ``BlockMask`` from
``mask_mod`` and, for top-k, a ``score_mod`` reading per-row thresholds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vlm.kernels import AttnSpec, reference_attention
from vlm.kernels.reference import semantic_mask, structural_mask, topk_mask


@dataclass
class Case:
    name: str
    b: int
    h: int
    nq: int
    nk: int
    d: int
    spec_fn: Callable[[torch.device], AttnSpec]


def _plain(**kw) -> Callable[[torch.device], AttnSpec]:
    return lambda dev: AttnSpec(**kw)


def _tcpa(dev: torch.device) -> AttnSpec:
    """TCPA on ViT-B/16: CLS + 2x18 prompts + 196 patches as keys, 197 queries, 4 of 18 selected."""
    kg = torch.cat([torch.zeros(1), torch.full((18,), 1), torch.full((18,), 2), torch.full((196,), 3)]).long()
    qg = torch.cat([torch.zeros(1), torch.full((196,), 3)]).long()
    allow = torch.zeros(4, 4, dtype=torch.bool)
    allow[0, [0, 1, 3]] = True
    allow[3, [0, 2, 3]] = True
    sel = torch.zeros(1, 197, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    for i in range(197):
        for m in torch.randperm(18, generator=gen)[:4].tolist():
            sel[0, i] |= 1 << m
    return AttnSpec(q_groups=qg.to(dev), k_groups=kg.to(dev), allow=allow.to(dev), subset_group=2,
                    row_subset=sel.to(dev), normalize="all_keys")


def cases(cpu: bool) -> list[Case]:
    b = 1 if cpu else 8
    llava = (600, 1500) if cpu else (600, 1500, 3000)
    out = [
        Case("CLIP ViT-B/16 (197+16 prompts)", b, 12, 213, 213, 64, _plain()),
        Case("ViT-L/14-336", b, 16, 577, 577, 64, _plain()),
        *[Case(f"LLaVA prefill N={n}, causal", 1, 32, n, n, 128, _plain(causal=True)) for n in llava],
        Case("TCPA 197x233 all_keys", b, 12, 197, 233, 64, _tcpa),
        Case("KTPP top-k (N=210, k=105)", b, 3, 210, 210, 64, _plain(topk=105)),
        Case("dense d=64 N=2048", 1 if cpu else 4, 16, 2048, 2048, 64, _plain()),
    ]
    return out


def masks(q: torch.Tensor, k: torch.Tensor, spec: AttnSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(denominator set, non-zero weights)`` masks ``[B, H, Nq, Nk]`` (outside timing)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    struct = structural_mask(spec, b, nq, nk, q.device).expand(b, h, nq, nk)
    sem = semantic_mask(spec, b, nq, nk, q.device).expand(b, h, nq, nk)
    if spec.normalize == "all_keys":
        return struct, struct & sem
    allowed = struct & sem
    if spec.topk is not None:
        scale = spec.scale or q.shape[-1] ** -0.5
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        allowed = topk_mask(scores, allowed, spec.topk)
    return allowed, allowed


def timeit(fn: Callable[[], object], cuda: bool, reps: int) -> float:
    """Median wall time in ms (after one warm-up call)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _flex_fn(case: Case, spec: AttnSpec, q, k, v, allowed: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    dense = allowed  # [B, H, Nq, Nk]; mask_mod reads it (exact for every field expressible)
    score_mod = None
    if spec.topk is not None:  # top-k as a score_mod on per-row thresholds (KTPP pass 2)
        scale = spec.scale or q.shape[-1] ** -0.5
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        thr = s.topk(spec.topk, dim=-1).values[..., -1].contiguous()
        dense = torch.ones_like(allowed)

        def score_mod(score, b, h, qi, kj):
            return torch.where(score >= thr[b, h, qi], score, -float("inf"))

    def mask_mod(b, h, qi, kj):
        return dense[b, h, qi, kj]

    block = create_block_mask(mask_mod, case.b, case.h, case.nq, case.nk, device=q.device)
    return lambda: flex(q, k, v, score_mod=score_mod, block_mask=block)


def run_case(case: Case, dev: torch.device, dtype: torch.dtype, cpu: bool, reps: int) -> list[str]:
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(case.b, case.h, n, case.d, device=dev, dtype=dtype, generator=gen)
               for n in (case.nq, case.nk, case.nk))
    spec = case.spec_fn(dev)
    denom, weights = masks(q, k, spec)
    fwd_flops = 2 * case.d * (int(denom.sum()) + int(weights.sum()))
    attn_bias = torch.zeros(denom.shape, device=dev, dtype=dtype).masked_fill(~weights, float("-inf"))
    impls: dict[str, Callable[[], object]] = {
        "reference": lambda: reference_attention(q, k, v, spec),
        "SDPA dense mask" + (" ≈" if spec.normalize == "all_keys" else ""):
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias),
    }
    if not cpu:
        from vlm.kernels.triton_attention import triton_attention

        impls["triton (ours)"] = lambda: triton_attention(q, k, v, spec)
        if spec.normalize != "all_keys":
            impls["flex (compiled)"] = _flex_fn(case, spec, q, k, v, denom)
    rows = []
    for name, fn in impls.items():
        ms = timeit(fn, dev.type == "cuda", reps)
        rows.append(f"| {case.name} | {name} | fwd | {ms:.3f} | {fwd_flops / ms / 1e9:.4f} |")
        if not cpu:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def fb(fn_name=name, leaves=leaves):
                if fn_name.startswith("triton"):
                    from vlm.kernels.triton_attention import triton_attention
                    out = triton_attention(*leaves, spec).out
                elif fn_name.startswith("SDPA"):
                    out = F.scaled_dot_product_attention(*leaves, attn_mask=attn_bias)
                elif fn_name.startswith("flex"):
                    return None
                else:
                    out = reference_attention(*leaves, spec).out
                out.sum().backward()

            if not name.startswith("flex"):
                ms_fb = timeit(fb, True, reps)
                rows.append(f"| {case.name} | {name} | fwd+bwd | {ms_fb:.3f} | {3.5 * fwd_flops / ms_fb / 1e9:.3f} |")
    return rows


def probe_overhead(dev: torch.device, dtype: torch.dtype, reps: int) -> list[str]:
    """Forward time of the fused kernel with and without ``probe_rows=[0]`` (ViT-L/14-336)."""
    from vlm.kernels.triton_attention import triton_attention

    q, k, v = (torch.randn(8, 16, 577, 64, device=dev, dtype=dtype) for _ in range(3))
    base = timeit(lambda: triton_attention(q, k, v, AttnSpec()), True, reps)
    probe = timeit(lambda: triton_attention(q, k, v, AttnSpec(probe_rows=torch.tensor([0], device=dev))), True, reps)
    return [f"| ViT-L/14-336 probe_rows=[0] | triton (ours) | fwd | {probe:.3f} (no probes: {base:.3f}, "
            f"+{100 * (probe / base - 1):.1f} %) | - |"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="reference and SDPA only, small batch")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    reps = args.reps or (5 if cpu else 20)
    print(f"device: {torch.cuda.get_device_name() if not cpu else _cpu_name()}, dtype: {dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps} (median)")
    print("| case | implementation | pass | ms | TFLOP/s (unmasked) |")
    print("|---|---|---|---|---|")
    for case in cases(cpu):
        for row in run_case(case, dev, dtype, cpu, reps):
            print(row, flush=True)
    if not cpu:
        for row in probe_overhead(dev, dtype, reps):
            print(row)


if __name__ == "__main__":
    main()
