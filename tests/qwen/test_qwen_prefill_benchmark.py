"""``benchmarks/prefill.py --model qwen2_5_vl|qwen3_vl`` runs at its smallest setting (``--size tiny``,
one repeat) and its table is consistent: one attention call per vision block whatever the budget,
the LLM sequence = text + kept merged tokens, and the KV cache's bytes proportional to it. Nothing
here is timed (benchmarks are never timed tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_prefill", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


@pytest.mark.parametrize("pruner", ["flowcut", "vtc_cls"])
def test_qwen_prefill_benchmark_runs_at_the_smallest_setting(bench, kind, pruner, capsys):
    rows = bench.main(["--model", kind, "--size", "tiny", "--repeats", "1", "--pruner", pruner])
    table = capsys.readouterr().out
    shape = bench.QWEN_SIZES[kind]["tiny"]
    hu, wu = shape["units"]
    depth, text = shape["vision"]["depth"], shape["text_tokens"]
    assert [r["budget"] for r in rows] == [hu * wu, *(hu * wu // f for f in bench.QWEN_FRACTIONS)]
    full = rows[0]
    assert full["length"] == text + hu * wu
    for row in rows:
        assert row["calls"] == depth, "one varlen attention call per vision block"
        assert row["kv"] * full["length"] == full["kv"] * row["length"], "KV bytes proportional to the tokens"
    for row in rows[1:]:
        assert row["kept"] == row["budget"] and row["length"] == text + row["budget"]
        assert row["ideal"] > 1.0
    assert table.count("\n| ") == len(rows) + 1 and "pruning overhead" in table  # header + one line per budget


def test_qwen_flops_count_the_grouped_kv_heads(bench):
    """The FLOP model: q/o projections over all heads, k/v over the key-value heads (GQA)."""
    from types import SimpleNamespace

    t = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=4, vocab_size=10)
    cfg = SimpleNamespace(text_config=t)
    n = 3
    linear = 2 * n * (2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16)
    attention = 2 * n * n * 8
    assert bench.qwen_llm_flops(cfg, n) == linear + attention + 2 * 8 * 10


def test_qwen_prefill_benchmark_skips_what_does_not_run_on_merge_units(bench, kind, capsys):
    """``--pruners``: a new merge-unit vision pruner runs; a CLS/grid one and an LLM-stage one are
    skipped with their reason; one combined table follows."""
    out = bench.main(["--model", kind, "--size", "tiny", "--repeats", "1", "--pruners", "divprune", "visionzip", "fastv"])
    printed = capsys.readouterr().out
    assert list(out) == ["divprune"]
    assert "skipped visionzip: declares runs_on_merge_units = False" in printed
    assert "skipped fastv: an LLM-stage pruner" in printed
    assert bench.COMBINED_HEADER in printed and printed.count("\n| divprune | ") == len(bench.QWEN_FRACTIONS)
    for row in out["divprune"][1:]:
        assert row["llm_ms"] > 0 and row["base_ms"] > 0 and row["delta"] is not None


def test_llava_prefill_benchmark_runs_a_vision_and_an_llm_stage_pruner(bench, capsys):
    """The LLaVA-1.5 table (``--size tiny``, one pair per timing) with a new vision pruner (DivPrune)
    and a new LLM-stage one (FastV): kept counts = the budgets, the LLM-stage FLOP model counts the
    layers up to the cut at full length, and with one pair the speed-up is the ratio of the printed
    ms (both come from the same pairs)."""
    rows = bench.main(["--size", "tiny", "--repeats", "1", "--pruners", "divprune", "fastv"])
    printed = capsys.readouterr().out
    n = (84 // 14) ** 2
    budgets = [n * 192 // 576, n * 128 // 576, n * 64 // 576]
    assert [(r["method"], r["budget"]) for r in rows] == [(m, b) for m in ("divprune", "fastv") for b in budgets]
    by = {(r["method"], r["budget"]): r for r in rows}
    for r in rows:
        assert r["kept"] == r["budget"] and r["ideal"] > 1.0
        assert r["speedup"] == pytest.approx(r["base_ms"] / r["llm_ms"], rel=1e-9)
        assert (r["delta"] is None) == (r["stage"] == "llm")
        assert (r["scoring"] is None) == (r["stage"] == "vision")  # measured inside the LLM-stage cut run
        assert r["stage"] == "vision" or 0.0 < r["scoring"] < 100.0
    for b in budgets:  # the cut after layer 1 of 3 saves less than the same cut before the LLM
        assert by[("fastv", b)]["ideal"] < by[("divprune", b)]["ideal"]
    assert bench.COMBINED_HEADER in printed and printed.count("\n| fastv | ") == len(budgets)


def test_llava_prefill_benchmark_runs_the_multi_cut_pruners(bench, capsys):
    """PyramidDrop and SparseVLM (three LLM cuts each) on the tiny LLaVA: their released schedules
    scaled to its 4 decoder layers; the FLOP model counts every stage at its own length; a budget the
    schedule cannot reach is skipped with PyramidDrop's own reason, not run at another budget."""
    rows = bench.main(["--size", "tiny", "--repeats", "1", "--pruners", "pyramiddrop", "sparsevlm"])
    printed = capsys.readouterr().out
    n = (84 // 14) ** 2
    assert [(r["method"], r["budget"]) for r in rows if r["method"] == "sparsevlm"] == [
        ("sparsevlm", n * b // 576) for b in (192, 128, 64)]
    assert "pyramiddrop @ 4: skipped (PyramidDrop: num_tokens=4 cannot be a layer-average" in printed
    for r in rows:
        assert r["stage"] == "llm" and 1.0 < r["ideal"] < n
    cfg = bench.build("tiny", bench.torch.float32, "cpu")[1]
    head = 2 * cfg.text_config.hidden_size * cfg.text_config.vocab_size

    def per_layer(n: int) -> float:  # the 4 decoder layers at one length share it equally
        return (bench.llm_flops(cfg, n) - head) / 4

    assert bench.llm_flops(cfg, 50, cuts=[(0, 40)]) == bench.llm_flops(cfg, 50, (0, 40))
    three = bench.llm_flops(cfg, 50, cuts=[(0, 40), (2, 30)])  # layer 0 at 50 | 1-2 at 40 | 3 at 30
    assert three == pytest.approx(per_layer(50) + 2 * per_layer(40) + per_layer(30) + head, rel=1e-12)


def test_the_cpu_allocator_is_set_steady(bench):
    """On glibc (this project's CI and Linux machines) the benchmark can keep freed memory for reuse;
    elsewhere it says it could not, and the header prints the default."""
    import platform

    set_to = bench.steady_allocator()
    if platform.libc_ver()[0] == "glibc":
        assert set_to.startswith("glibc mallopt: mmap threshold 32 MiB")
    else:
        assert set_to == ""
