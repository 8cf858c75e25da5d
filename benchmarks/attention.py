"""Attention benchmark: the fused Triton kernel vs SDPA (dense mask), compiled FlexAttention and the reference.

Usage::

    python benchmarks/attention.py                  # GPU: every case and backend, fwd and fwd+bwd
    python benchmarks/attention.py --case tcpa,ktpp # GPU: only these cases (keys, or name substrings)
    python benchmarks/attention.py --list           # the case keys
    python benchmarks/attention.py --cpu            # CPU: reference and SDPA forward only, small batch

Throughput counts only unmasked work. For a (batch, head) with ``A`` pairs in the denominator
set and ``W`` pairs with a non-zero final weight, the forward costs ``2 d A`` (``q k^T``) plus
``2 d W`` (``P V``) FLOPs; forward+backward counts 3.5x the forward (FlashAttention convention:
backward = 2.5x forward). Masks of the SDPA path are built before timing; SDPA and FlexAttention
cannot express ``all_keys`` (TCPA), so their TCPA lines run the renormalised variant and are
marked ``≈``. FlexAttention runs compiled (``torch.compile(flex_attention)``) with the mask given
as an index function (``mask_mod`` reading group ids, bit words and lengths, as the spec does)
turned into a ``BlockMask`` by ``create_block_mask``, so it skips empty tiles like our kernel;
top-k is a ``score_mod`` on per-row thresholds computed before timing (marked ``thr given``).
``attention()`` is ``vlm.kernels.attention``: what the models run (SDPA for plain, padded and
causal calls, the Triton kernel for the structured ones).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vlm.kernels import AttnSpec, attention, reference_attention
from vlm.kernels.reference import semantic_mask, structural_mask, subset_rank, topk_mask


@dataclass
class Case:
    key: str
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


def _documents(n: int, docs: int) -> Callable[[torch.device], AttnSpec]:
    """``docs`` packed documents of equal length: block-diagonal attention through groups."""
    def spec(dev: torch.device) -> AttnSpec:
        g = (torch.arange(n, device=dev) * docs // n).long()
        return AttnSpec(q_groups=g, k_groups=g, allow=torch.eye(docs, dtype=torch.bool, device=dev))
    return spec


def cases(cpu: bool) -> list[Case]:
    b = 1 if cpu else 8
    out = [
        Case("vitb", "CLIP ViT-B/16 (197+16 prompts)", b, 12, 213, 213, 64, _plain()),
        Case("vitl", "ViT-L/14-336", b, 16, 577, 577, 64, _plain()),
        *[Case(f"llava{n}", f"LLaVA prefill N={n}, causal", 1, 32, n, n, 128, _plain(causal=True))
          for n in ((600, 1500) if cpu else (600, 1500, 3000))],
        Case("tcpa", "TCPA 197x233 all_keys", b, 12, 197, 233, 64, _tcpa),
        Case("ktpp", "KTPP top-k (N=210, k=105)", b, 3, 210, 210, 64, _plain(topk=105)),
        Case("docs", "8 documents block-diagonal N=4096", 1 if cpu else 2, 16, 4096, 4096, 64, _documents(4096, 8)),
        Case("dense2048", "dense d=64 N=2048", 1 if cpu else 4, 16, 2048, 2048, 64, _plain()),
    ]
    return [c for c in out if not (cpu and c.key == "docs")]


def select(all_cases: list[Case], wanted: Optional[str]) -> list[Case]:
    """Cases whose key equals, or whose name contains, one of the comma-separated ``wanted``."""
    if not wanted:
        return all_cases
    keys = [w.strip() for w in wanted.split(",") if w.strip()]
    chosen = [c for c in all_cases if any(w == c.key or w.lower() in c.name.lower() for w in keys)]
    if not chosen:
        raise SystemExit(f"--case {wanted!r} matches no case; keys: {', '.join(c.key for c in all_cases)}")
    return chosen


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


def flex_mask_mod(spec: AttnSpec, nq: int, nk: int, dev: torch.device) -> Optional[Callable]:
    """The spec's mask as a FlexAttention index function (no dense tensor): group ids, the allow
    matrix, subset ranks and bit words, lengths and the causal diagonal, read per (q, kv)."""
    parts: list[Callable] = []
    if spec.causal:
        parts.append(lambda b, h, qi, kj: kj <= qi + (nk - nq))
    if spec.k_lengths is not None:
        lengths = spec.k_lengths.to(dev)
        parts.append(lambda b, h, qi, kj: kj < lengths[b])
    if spec.q_groups is not None:  # 1-D groups (the cases here); row_subset needs its group ids
        qg, kg = spec.q_groups.to(dev), spec.k_groups.to(dev)
        if spec.allow is not None:
            allow = spec.allow.to(dev)
            parts.append(lambda b, h, qi, kj: allow[qg[qi], kg[kj]])
        if spec.row_subset is not None:
            rank = subset_rank(kg, spec.subset_group)
            words = spec.row_subset.to(dev)[0]  # one word per row (<= 64 subset keys)

            def subset(b, h, qi, kj):
                r = rank[kj]
                return (r < 0) | (((words[qi] >> torch.clamp(r, min=0)) & 1) == 1)
            parts.append(subset)
    if not parts:
        return None

    def mask_mod(b, h, qi, kj):
        ok = parts[0](b, h, qi, kj)
        for part in parts[1:]:
            ok = ok & part(b, h, qi, kj)
        return ok
    return mask_mod


_FLEX: dict = {}


def flex_call(case: Case, spec: AttnSpec, q, k) -> Optional[Callable]:
    """``fn(q, k, v) -> out`` through compiled FlexAttention, or None when the spec has no Flex form."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention)
    flex = _FLEX["compiled"]
    mask_mod = flex_mask_mod(spec, case.nq, case.nk, q.device)
    block = None if mask_mod is None else create_block_mask(mask_mod, None, None, case.nq, case.nk, device=q.device)
    score_mod = None
    if spec.topk is not None:  # KTPP pass 2 on thresholds found before timing
        scale = spec.scale or q.shape[-1] ** -0.5
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        thr = s.topk(spec.topk, dim=-1).values[..., -1].contiguous()

        def score_mod(score, b, h, qi, kj):
            return torch.where(score >= thr[b, h, qi], score, -float("inf"))
    return lambda q_, k_, v_: flex(q_, k_, v_, score_mod=score_mod, block_mask=block, scale=spec.scale)


def run_case(case: Case, dev: torch.device, dtype: torch.dtype, cpu: bool, reps: int, bwd: bool) -> list[str]:
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(case.b, case.h, n, case.d, device=dev, dtype=dtype, generator=gen)
               for n in (case.nq, case.nk, case.nk))
    spec = case.spec_fn(dev)
    denom, weights = masks(q, k, spec)
    fwd_flops = 2 * case.d * (int(denom.sum()) + int(weights.sum()))
    attn_bias = torch.zeros(denom.shape, device=dev, dtype=dtype).masked_fill(~weights, float("-inf"))
    approx = " ≈" if spec.normalize == "all_keys" else ""
    impls: dict[str, Callable] = {
        "reference": lambda q_, k_, v_: reference_attention(q_, k_, v_, spec).out,
        "SDPA dense mask" + approx: lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=attn_bias),
    }
    if not cpu:
        from vlm.kernels.triton_attention import triton_attention

        impls["attention() dispatch"] = lambda q_, k_, v_: attention(q_, k_, v_, spec).out
        impls["triton (ours)"] = lambda q_, k_, v_: triton_attention(q_, k_, v_, spec).out
        flex_spec = spec.replace(normalize="softmax") if spec.normalize == "all_keys" else spec
        flex = flex_call(case, flex_spec, q, k)
        name = "flex (compiled, index mask)" + approx + (", thr given" if spec.topk is not None else "")
        impls[name] = flex
    rows = []
    for name, fn in impls.items():
        ms = timeit(lambda fn=fn: fn(q, k, v), dev.type == "cuda", reps)
        rows.append(f"| {case.name} | {name} | fwd | {ms:.3f} | {fwd_flops / ms / 1e9:.4f} |")
        if bwd and not cpu:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def fb(fn=fn, leaves=leaves):
                fn(*leaves).sum().backward()

            ms_fb = timeit(fb, True, reps)
            rows.append(f"| {case.name} | {name} | fwd+bwd | {ms_fb:.3f} | {3.5 * fwd_flops / ms_fb / 1e9:.3f} |")
    return rows


def probe_overhead(dev: torch.device, dtype: torch.dtype, reps: int) -> list[str]:
    """Forward time with and without ``probe_rows=[0]`` (ViT-L/14-336): the fused kernel, and
    ``attention()`` (SDPA plus probe rows recomputed from the lse)."""
    from vlm.kernels.triton_attention import triton_attention

    q, k, v = (torch.randn(8, 16, 577, 64, device=dev, dtype=dtype) for _ in range(3))
    probe = AttnSpec(probe_rows=torch.tensor([0], device=dev))
    rows = []
    for name, fn in (("triton (ours)", triton_attention), ("attention() dispatch", attention)):
        base = timeit(lambda fn=fn: fn(q, k, v, AttnSpec()), True, reps)
        with_probe = timeit(lambda fn=fn: fn(q, k, v, probe), True, reps)
        rows.append(f"| ViT-L/14-336 probe_rows=[0] | {name} | fwd | {with_probe:.3f} (no probes: {base:.3f}, "
                    f"+{100 * (with_probe / base - 1):.1f} %) | - |")
    return rows


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
    ap.add_argument("--case", default=None, help="comma-separated case keys or name substrings (default: all)")
    ap.add_argument("--list", action="store_true", help="print the case keys and exit")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--no-probes", action="store_true", help="skip the probe-row overhead line")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    if args.list:
        for c in cases(cpu):
            print(f"{c.key:<10} {c.name}  (B={c.b}, H={c.h}, Nq={c.nq}, Nk={c.nk}, d={c.d})")
        return
    chosen = select(cases(cpu), args.case)
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    reps = args.reps or (5 if cpu else 20)
    print(f"device: {torch.cuda.get_device_name() if not cpu else _cpu_name()}, dtype: {dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps} (median)")
    print("| case | implementation | pass | ms | TFLOP/s (unmasked) |")
    print("|---|---|---|---|---|")
    for case in chosen:
        for row in run_case(case, dev, dtype, cpu, reps, not args.no_bwd):
            print(row, flush=True)
    if not cpu and not args.no_probes and not args.case:
        for row in probe_overhead(dev, dtype, reps):
            print(row)


if __name__ == "__main__":
    main()
