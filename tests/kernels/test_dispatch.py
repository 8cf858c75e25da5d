"""``vlm.kernels.attention`` picks a backend per call; every backend agrees with the reference."""

from __future__ import annotations

import pytest
import torch

from vlm.kernels import AttnSpec, attention, reference_attention
from vlm.kernels import dispatch


@pytest.mark.parametrize(
    "spec",
    [AttnSpec(), AttnSpec(causal=True), AttnSpec(k_lengths=torch.tensor([5, 2])), AttnSpec(causal=True, k_lengths=torch.tensor([7, 3]))],
    ids=["plain", "causal", "lengths", "causal+lengths"],
)
def test_cpu_fast_path_matches_reference(spec):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    assert dispatch._cpu_fast_ok(q, spec)
    fast, ref = attention(q, k, v, spec), reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(fast.out.double(), ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.lse.double(), ref.lse.double(), atol=1e-5, rtol=1e-5)


def test_structured_specs_use_the_reference(monkeypatch):
    spec = AttnSpec(q_groups=torch.tensor([0, 1]), k_groups=torch.tensor([0, 1, 1]), allow=torch.ones(2, 2, dtype=torch.bool))
    assert not dispatch._cpu_fast_ok(torch.randn(1, 1, 2, 4), spec)
    assert not dispatch._cpu_fast_ok(torch.randn(1, 1, 2, 4), AttnSpec(topk=1))


@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 3])])
def test_cpu_fast_path_probes_equal_reference_rows(lengths):
    """Probe rows on the fast path come from the row logsumexp, without an N x N matrix."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    spec = AttnSpec(probe_rows=torch.tensor([0, 3]), k_lengths=lengths)
    assert dispatch._cpu_fast_ok(q, spec)
    fast, ref = attention(q, k, v, spec), reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(fast.probes.double(), ref.probes.double(), atol=1e-6, rtol=1e-5)


def test_backend_env_forces_reference(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    calls = []
    monkeypatch.setattr(dispatch, "reference_attention", lambda *a: calls.append(1) or reference_attention(*a))
    attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    assert calls == [1]


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="normalize"):
        AttnSpec(normalize="nope")
    with pytest.raises(ValueError, match="subset_group"):
        AttnSpec(row_subset=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="together"):
        AttnSpec(q_groups=torch.zeros(1))
