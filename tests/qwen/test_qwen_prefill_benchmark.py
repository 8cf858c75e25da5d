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
