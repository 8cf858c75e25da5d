"""What the prefill benchmark's tables share (``prefill.py``, ``prefill_qwen.py``): timing (medians
of repeated runs, and pairs of runs timed alternately so that drift in the machine's speed hits both
sides alike), the image placeholder id of the random models, and the combined table."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

IMAGE_TOKEN = 3

#: glibc ``mallopt`` parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def steady_allocator() -> str:
    """Keep the CPU allocator's freed memory for reuse, so that a timed run does not pay for page
    faults that another run of the same work does not (glibc ``mallopt``: blocks up to 32 MiB from
    the heap instead of fresh ``mmap``s, no heap trimming below 2 GiB, 256 MiB top pad).

    Why: with glibc's defaults every large tensor is mapped afresh and zero-filled page by page, and
    how often depends on how much memory a code path keeps alive, not on its work. Measured on the
    small LLaVA (one thread): a layer-by-layer prefill that fills a KV cache took 10 % longer than
    the same layers without one, and an LLM-stage cut that scores almost nothing 10-14 % longer
    than ``self.lm``'s prefill; with these settings both differences are under 0.3 % and every
    prefill is ~7 % faster. Returns what was set, for the printed header ("" where not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return ""
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 << 20))
    if not all(mallopt(option, value) == 1 for option, value in settings):
        return ""
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 2 GiB, top pad 256 MiB"


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


def median_ratio(num: list[float], den: list[float]) -> float:
    """The median of the within-pair ratios ``num[i] / den[i]``."""
    return statistics.median(a / b for a, b in zip(num, den))


COMBINED_HEADER = ("| method | budget | LLM prefill ms | unpruned ms | speed-up | ms ratio | FLOP ideal | ratio | "
                   "overhead % | scoring % | vision Δ % |")


def print_combined(rows: list[dict[str, Any]]) -> None:
    """One markdown table over every pruner's budget rows (:func:`llava` / :func:`qwen` rows)."""
    print(COMBINED_HEADER)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        delta = "-" if r.get("delta") is None else f"{r['delta']:.2f}"
        scoring = "-" if r.get("scoring") is None else f"{r['scoring']:.2f}"
        print(f"| {r['method']} | {r['budget']} | {r['llm_ms']:.1f} | {r['base_ms']:.1f} | {r['speedup']:.2f} | "
              f"{r['base_ms'] / r['llm_ms']:.2f} | {r['ideal']:.2f} | {r['speedup'] / r['ideal']:.2f} | "
              f"{r['overhead']:.2f} | {scoring} | {delta} |")
