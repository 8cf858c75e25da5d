"""``vlm.kernels.attention`` picks a backend per call; every backend agrees with the reference.

The CUDA routes are decided by ``dispatch.choose_route``, a pure function, so the decision is
tested here without a GPU; the SDPA glue runs on CPU against stand-ins of the CUDA ops that
follow their documented semantics (top-left ``is_causal``, additive bias, lse rows padded to 32).
"""

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
    assert _cpu_route(q, k, spec) == "cpu_flash"
    fast, ref = attention(q, k, v, spec), reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(fast.out.double(), ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.lse.double(), ref.lse.double(), atol=1e-5, rtol=1e-5)


def _cpu_route(q, k, spec):
    return dispatch.choose_route(spec, device_type="cpu", dtype=q.dtype, head_dim=q.shape[-1], nq=q.shape[-2],
                                 nk=k.shape[-2], lengths_ok=dispatch._lengths_ok(spec))


def test_structured_specs_use_the_reference(monkeypatch):
    spec = AttnSpec(q_groups=torch.tensor([0, 1]), k_groups=torch.tensor([0, 1, 1]), allow=torch.ones(2, 2, dtype=torch.bool))
    q = torch.randn(1, 1, 2, 4)
    assert _cpu_route(q, q, spec) == "reference"
    assert _cpu_route(q, q, AttnSpec(topk=1)) == "reference"
    assert _cpu_route(q, q, AttnSpec(k_lengths=torch.tensor([0]))) == "reference"  # a row without keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 3])])
def test_cpu_fast_path_probes_equal_reference_rows(lengths, causal):
    """Probe rows on the fast path come from the row logsumexp, without an N x N matrix."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    spec = AttnSpec(probe_rows=torch.tensor([0, 3]), k_lengths=lengths, causal=causal)
    assert _cpu_route(q, k, spec) == "cpu_flash"
    fast, ref = attention(q, k, v, spec), reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(fast.probes.double(), ref.probes.double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("structured", [False, True], ids=["causal", "causal+groups"])
def test_varlen_without_kernel_runs_each_sequence_on_its_route(monkeypatch, structured):
    """Packed varlen where the Triton kernel does not run (here: CPU) is split per sequence, and each
    sequence takes the route its own spec gets: the fused CPU op for plain causal attention."""
    torch.manual_seed(3)
    cu = torch.tensor([0, 5, 12, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 8) for _ in range(3))
    groups = dict(q_groups=torch.arange(13) % 2, k_groups=torch.arange(13) % 2,
                  allow=torch.tensor([[True, False], [True, True]])) if structured else {}
    spec = AttnSpec(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, **groups)
    fused, real = [], dispatch.torch_attention
    monkeypatch.setattr(dispatch, "torch_attention", lambda *a: fused.append(tuple(a[0].shape)) or real(*a))
    out = attention(q, k, v, spec)
    ref = reference_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(out.out.double(), ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lse.double(), ref.lse.double(), atol=1e-5, rtol=1e-5)
    assert fused == ([] if structured else [(1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 1, 8)])


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


# --------------------------------------------------------------------------------------------
# CUDA routing (a pure decision, tested without a GPU)

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
GROUPS = dict(q_groups=torch.tensor([0, 1]), k_groups=torch.tensor([0, 1, 1]), allow=torch.ones(2, 2, dtype=torch.bool))


def _cuda(spec, dtype=BF16, d=64, nq=128, nk=128, **kw):
    kw.setdefault("triton_ok", True)
    return dispatch.choose_route(spec, device_type="cuda", dtype=dtype, head_dim=d, nq=nq, nk=nk, **kw)


@pytest.mark.parametrize("spec,kw,route", [
    (AttnSpec(), {}, "sdpa_flash"),
    (AttnSpec(), dict(dtype=F16, d=128), "sdpa_flash"),
    (AttnSpec(probe_rows=torch.tensor([0])), {}, "sdpa_flash"),
    (AttnSpec(scale=0.1), {}, "sdpa_flash"),
    (AttnSpec(causal=True), {}, "sdpa_flash"),  # square: top-left == bottom-right
    (AttnSpec(causal=True), dict(nq=100, nk=128), "sdpa_efficient"),  # bottom-right needs a mask
    (AttnSpec(causal=True), dict(nq=129, nk=128), "triton"),  # rows without keys: exact rule
    (AttnSpec(k_lengths=torch.tensor([5])), {}, "sdpa_efficient"),
    (AttnSpec(k_lengths=torch.tensor([5])), dict(lengths_ok=False), "triton"),
    (AttnSpec(), dict(dtype=F32), "sdpa_efficient"),  # the flash kernel has no fp32
    (AttnSpec(), dict(flash_capable=False), "sdpa_efficient"),  # pre-sm_80
    (AttnSpec(), dict(d=24), "sdpa_flash"),
    (AttnSpec(), dict(d=20), "triton"),  # SDPA's kernels need d % 8 == 0
    (AttnSpec(), dict(d=20, triton_ok=False), "reference"),
    (AttnSpec(), dict(dtype=torch.float64, triton_ok=False), "reference"),
    (AttnSpec(**GROUPS), {}, "triton"),
    (AttnSpec(**GROUPS, normalize="all_keys"), {}, "triton"),
    (AttnSpec(**GROUPS, normalize="segmented", segment_gate=0.5), {}, "triton"),
    (AttnSpec(topk=4), {}, "triton"),
    (AttnSpec(epilogue_add=torch.zeros(1, 1, 64)), {}, "triton"),
    (AttnSpec(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
              cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32)), {}, "triton"),
    (AttnSpec(topk=4), dict(triton_ok=False), "reference"),
    (AttnSpec(topk=4), dict(forced="torch"), "reference"),
    (AttnSpec(), dict(forced="torch"), "sdpa_flash"),
    (AttnSpec(), dict(forced="triton"), "triton"),
    (AttnSpec(), dict(forced="reference"), "reference"),
], ids=lambda x: None)
def test_cuda_route(spec, kw, route):
    assert _cuda(spec, **kw) == route


def test_forced_triton_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="does not support"):
        _cuda(AttnSpec(topk=3), triton_ok=False, forced="triton")


def test_every_route_is_listed():
    assert {_cuda(AttnSpec()), _cuda(AttnSpec(), dtype=F32), _cuda(AttnSpec(topk=2)),
            _cuda(AttnSpec(topk=2), triton_ok=False), _cpu_route(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                                                                 AttnSpec())} == set(dispatch.ROUTES)


# --------------------------------------------------------------------------------------------
# the SDPA glue, run on CPU against stand-ins of the CUDA ops


def _dense(q, k, v, bias, top_left_causal, scale):
    """What PyTorch's fused CUDA ops compute: softmax(q k^T * scale + bias), ``is_causal`` top-left."""
    s = (q.double() @ k.double().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias.double()
    if top_left_causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


@pytest.fixture
def fake_cuda_ops(monkeypatch):
    calls = []

    def flash(q, k, v, dropout, is_causal, debug, *, scale=None):
        calls.append(("flash", is_causal, None))
        out, lse = _dense(q, k, v, None, is_causal, scale)
        return (out.to(q.dtype), lse.float()) + (None,) * 7

    def efficient(q, k, v, bias, compute_lse, dropout=0.0, is_causal=False, *, scale=None):
        assert compute_lse and (bias is None or bias.stride(-2) % 16 == 0), "bias rows must be 16-aligned"
        calls.append(("efficient", is_causal, None if bias is None else tuple(bias.shape)))
        out, lse = _dense(q, k, v, bias, is_causal, scale)
        pad = (-lse.shape[-1]) % 32
        lse = torch.nn.functional.pad(lse, (0, pad), value=float("inf"))  # the op's padded rows
        return out.to(q.dtype), lse.float(), None, None

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", flash, raising=False)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", efficient, raising=False)
    return calls


@pytest.mark.parametrize("spec,nq,nk,route,expect", [
    (AttnSpec(probe_rows=torch.tensor([0, 4])), 20, 20, "sdpa_flash", ("flash", False, None)),
    (AttnSpec(causal=True, probe_rows=torch.tensor([3])), 20, 20, "sdpa_flash", ("flash", True, None)),
    (AttnSpec(causal=True, scale=0.2), 20, 20, "sdpa_efficient", ("efficient", True, None)),
    (AttnSpec(causal=True, probe_rows=torch.tensor([0, 9])), 10, 27, "sdpa_efficient",
     ("efficient", False, (2, 3, 10, 27))),
    (AttnSpec(k_lengths=torch.tensor([27, 4]), causal=True, probe_rows=torch.tensor([1])), 27, 27, "sdpa_efficient",
     ("efficient", False, (2, 3, 27, 27))),
    (AttnSpec(), 40, 33, "sdpa_efficient", ("efficient", False, None)),
])
def test_sdpa_glue_matches_reference(fake_cuda_ops, spec, nq, nk, route, expect):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (nq, nk, nk))
    got = dispatch.sdpa_attention(q, k, v, spec, route)
    ref = reference_attention(q.double(), k.double(), v.double(), spec)
    assert fake_cuda_ops == [expect]
    assert got.lse.dtype == torch.float32 and got.lse.shape == (2, 3, nq)
    torch.testing.assert_close(got.out.double(), ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse.double(), ref.lse.double(), atol=1e-5, rtol=1e-5)
    if spec.probe_rows is not None:
        torch.testing.assert_close(got.probes.double(), ref.probes.double(), atol=1e-6, rtol=1e-5)
