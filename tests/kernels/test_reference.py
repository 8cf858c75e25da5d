"""Each AttnSpec field of the reference on small cases whose answer is computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlm.kernels import AttnSpec, reference_attention

D64 = torch.float64


def zeros_q(nq: int, d: int = 2) -> torch.Tensor:
    """Zero queries make every logit 0, so softmax weights are uniform over the allowed keys."""
    return torch.zeros(1, 1, nq, d, dtype=D64)


def values(nk: int) -> torch.Tensor:
    """v[j] = [j, 10 j]: the output reveals exactly which keys were averaged."""
    j = torch.arange(nk, dtype=D64)
    return torch.stack([j, 10 * j], -1)[None, None]


def test_plain_softmax_matches_formula():
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=D64)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]]], dtype=D64)
    v = values(3)
    s = [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)]
    z = sum(math.exp(x) for x in s)
    w = [math.exp(x) / z for x in s]
    out = reference_attention(q, k, v)
    assert out.out[0, 0, 0, 0].item() == pytest.approx(w[1] * 1 + w[2] * 2)
    assert out.lse[0, 0, 0].item() == pytest.approx(math.log(z))


def test_k_lengths_excludes_padding():
    out = reference_attention(zeros_q(1), zeros_q(4), values(4), AttnSpec(k_lengths=torch.tensor([2])))
    assert out.out[0, 0, 0].tolist() == pytest.approx([0.5, 5.0])  # mean of keys 0 and 1
    assert out.lse.item() == pytest.approx(math.log(2))


def test_causal_is_bottom_right_aligned():
    out = reference_attention(zeros_q(2), zeros_q(3), values(3), AttnSpec(causal=True))
    assert out.out[0, 0, 0, 0].item() == pytest.approx(0.5)  # row 0 sees keys 0, 1
    assert out.out[0, 0, 1, 0].item() == pytest.approx(1.0)  # row 1 sees keys 0, 1, 2


def test_group_allow_matrix():
    spec = AttnSpec(
        q_groups=torch.tensor([0, 1]),
        k_groups=torch.tensor([0, 1, 1, 0]),
        allow=torch.tensor([[True, False], [True, True]]),
    )
    out = reference_attention(zeros_q(2), zeros_q(4), values(4), spec)
    assert out.out[0, 0, 0, 0].item() == pytest.approx((0 + 3) / 2)  # group 0 sees keys 0 and 3
    assert out.out[0, 0, 1, 0].item() == pytest.approx((0 + 1 + 2 + 3) / 4)


def test_row_subset_bits_index_the_subset_group_in_key_order():
    # keys: 0 is group 0; 1, 2, 3 are group 1 (ranks 0, 1, 2). Bits 0b101 allow ranks 0 and 2.
    spec = AttnSpec(
        q_groups=torch.tensor([0]), k_groups=torch.tensor([0, 1, 1, 1]), subset_group=1, row_subset=torch.tensor([[0b101]])
    )
    out = reference_attention(zeros_q(1), zeros_q(4), values(4), spec)
    assert out.out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3) / 3)


def test_row_subset_multiword_for_groups_over_64():
    nk = 70
    kg = torch.ones(nk, dtype=torch.long)
    words = torch.zeros(1, 1, 2, dtype=torch.long)
    words[0, 0, 1] = 1 << (68 - 64)  # only rank 68
    spec = AttnSpec(q_groups=torch.tensor([1]), k_groups=kg, subset_group=1, row_subset=words)
    out = reference_attention(zeros_q(1), zeros_q(nk), values(nk), spec)
    assert out.out[0, 0, 0, 0].item() == pytest.approx(68.0)


def test_all_keys_zeroes_without_renormalising():
    spec = AttnSpec(
        q_groups=torch.tensor([0]), k_groups=torch.tensor([0, 1, 1, 1]), allow=torch.tensor([[True, False], [True, True]]),
        normalize="all_keys",
    )
    out = reference_attention(zeros_q(1), zeros_q(4), values(4), spec, )
    assert out.out[0, 0, 0, 0].item() == pytest.approx(0 / 4)  # only key 0 kept, weight 1/4
    assert out.lse.item() == pytest.approx(math.log(4))  # denominator over all keys
    spec = spec.replace(allow=None, subset_group=1, row_subset=torch.tensor([[0b011]]))
    out = reference_attention(zeros_q(1), zeros_q(4), values(4), spec)
    assert out.out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 2) / 4)  # rank 2 (key 3) zeroed


def test_segmented_exact_gate_is_softmax_and_fixed_gate_mixes_groups():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4, dtype=D64), torch.randn(1, 2, 5, 4, dtype=D64), torch.randn(1, 2, 5, 4, dtype=D64)
    groups = dict(q_groups=torch.zeros(3, dtype=torch.long), k_groups=torch.tensor([0, 0, 1, 1, 1]))
    exact = reference_attention(q, k, v, AttnSpec(**groups, normalize="segmented"))
    torch.testing.assert_close(exact.out, reference_attention(q, k, v).out)
    torch.testing.assert_close(exact.lse, reference_attention(q, k, v).lse)
    half = reference_attention(zeros_q(1), zeros_q(5), values(5), AttnSpec(**{**groups, "q_groups": torch.tensor([0])}, normalize="segmented", segment_gate=0.5))
    assert half.out[0, 0, 0, 0].item() == pytest.approx(0.5 * (0 + 1) / 2 + 0.5 * (2 + 3 + 4) / 3)


def test_topk_keeps_the_k_largest_and_ties():
    q = torch.tensor([[[[1.0]]]], dtype=D64)
    k = torch.tensor([[[[3.0], [1.0], [2.0], [2.0], [0.0]]]], dtype=D64)
    v = values(5)
    out = reference_attention(q, k, v, AttnSpec(topk=2, scale=1.0))
    w = torch.tensor([math.exp(3), 0, math.exp(2), math.exp(2), 0])  # 2nd largest is 2, tied: keys 2 and 3 stay
    w = w / w.sum()
    assert out.out[0, 0, 0, 0].item() == pytest.approx(float((w * torch.arange(5)).sum()))
    full = reference_attention(q, k, v, AttnSpec(topk=5))
    torch.testing.assert_close(full.out, reference_attention(q, k, v).out)


def test_epilogue_add_and_probe_rows():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 3, 4, dtype=D64) for _ in range(3))
    e = torch.randn(2, 2, 4, dtype=D64)
    base = reference_attention(q, k, v)
    out = reference_attention(q, k, v, AttnSpec(epilogue_add=e, probe_rows=torch.tensor([0, 2])))
    torch.testing.assert_close(out.out, base.out + e[:, :, None])
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    torch.testing.assert_close(out.probes, weights[:, :, [0, 2]].float())


def test_fully_masked_row_outputs_zero_with_finite_grads():
    q = torch.randn(1, 1, 2, 4, dtype=D64, requires_grad=True)
    k = torch.randn(1, 1, 3, 4, dtype=D64, requires_grad=True)
    v = torch.randn(1, 1, 3, 4, dtype=D64, requires_grad=True)
    spec = AttnSpec(q_groups=torch.tensor([0, 1]), k_groups=torch.tensor([0, 0, 0]), allow=torch.tensor([[True], [False]]))
    out = reference_attention(q, k, v, spec)
    assert torch.all(out.out[0, 0, 1] == 0) and out.lse[0, 0, 1] == float("-inf")
    out.out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_masks_broadcast_over_batch_and_heads():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 4, 8, dtype=D64) for _ in range(3))
    qg = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    kg = torch.tensor([0, 1, 0, 1])
    allow = torch.tensor([[True, False], [True, True]])
    out = reference_attention(q, k, v, AttnSpec(q_groups=qg, k_groups=kg, allow=allow))
    for b in range(2):
        for h in range(3):
            for i in range(4):
                keys = [j for j in range(4) if allow[qg[b, i], kg[j]]]
                w = torch.softmax(q[b, h, i] @ k[b, h, keys].T / math.sqrt(8), -1)
                torch.testing.assert_close(out.out[b, h, i], w @ v[b, h, keys])


def test_varlen_equals_per_sequence_attention():
    torch.manual_seed(3)
    lens_q, lens_k = [2, 3], [3, 1]
    q = torch.randn(sum(lens_q), 2, 4, dtype=D64)
    k = torch.randn(sum(lens_k), 2, 4, dtype=D64)
    v = torch.randn(sum(lens_k), 2, 4, dtype=D64)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    out = reference_attention(q, k, v, AttnSpec(cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k)))
    for i, (a, b, c, d) in enumerate([(0, 2, 0, 3), (2, 5, 3, 4)]):
        ref = reference_attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None], v[c:d].transpose(0, 1)[None])
        torch.testing.assert_close(out.out[a:b], ref.out[0].transpose(0, 1))
