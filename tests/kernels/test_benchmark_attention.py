"""``benchmarks/attention.py``: case selection, and FlexAttention's index-function masks equal
the spec's dense masks (a wrong ``mask_mod`` would make the GPU comparison meaningless)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_case_selection_by_key_and_name(bench):
    all_cases = bench.cases(cpu=False)
    assert [c.key for c in bench.select(all_cases, "tcpa,ktpp")] == ["tcpa", "ktpp"]
    assert {c.key for c in bench.select(all_cases, "LLaVA")} == {"llava600", "llava1500", "llava3000"}
    assert bench.select(all_cases, None) == all_cases
    with pytest.raises(SystemExit, match="keys: vitb"):
        bench.select(all_cases, "nope")


@pytest.mark.parametrize("key,extra", [("tcpa", {}), ("docs", {}), ("vitb", dict(causal=True)),
                                       ("vitb", dict(k_lengths=torch.tensor([200]))), ("dense2048", {})])
def test_flex_index_mask_equals_dense_mask(bench, key, extra):
    case = next(c for c in bench.cases(cpu=False) if c.key == key)
    spec = case.spec_fn(torch.device("cpu")).replace(**extra)
    nq, nk = (case.nq, case.nk) if key != "vitb" else (150, case.nk)
    mask_mod = bench.flex_mask_mod(spec, nq, nk, torch.device("cpu"))
    q = torch.zeros(1, 1, nq, 8)
    k = torch.zeros(1, 1, nk, 8)
    denom, weights = bench.masks(q, k, spec.replace(normalize="softmax"))
    if mask_mod is None:
        assert bool(denom.all())
        return
    b = torch.zeros((), dtype=torch.long)
    got = mask_mod(b, b, torch.arange(nq)[:, None], torch.arange(nk)[None, :]).expand(nq, nk)
    assert torch.equal(got, denom[0, 0]) and not bool(got.all())
