"""``AttnSpec.probe_mean_query``: the weights of each sample's mean query over its keys, the global
query that stands in for a CLS row on towers without one. Checked against a plain loop, on the
padded, key/value-only and packed layouts, and on every route the attention function takes."""

from __future__ import annotations

import pytest
import torch

from vlm.kernels import AttnSpec, attention


def plain(q, k, n_q, n_k, scale):
    """``softmax_j(scale * mean_{i < n_q} q_i . k_j)`` over the first ``n_k`` keys, per head."""
    q_bar = q[:, :n_q].mean(1)
    return (torch.einsum("hd,hnd->hn", q_bar, k[:, :n_k]) * scale).softmax(-1)


@pytest.mark.parametrize("backend", ["reference", "default"])
def test_padded_rows_with_padding_and_kv_only_keys(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("VLM_ATTENTION_BACKEND", "reference")
    torch.manual_seed(0)
    b, h, nq, nk, d = 3, 2, 6, 8, 16  # two key/value-only keys: queries are the keys' last six
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    lengths = torch.tensor([8, 5, 7])
    out = attention(q, k, v, AttnSpec(k_lengths=lengths, probe_mean_query=True))
    for i in range(b):
        n = int(lengths[i])
        want = plain(q[i], k[i], n - (nk - nq), n, d**-0.5)
        torch.testing.assert_close(out.mean_probe[i, :, :n], want, atol=1e-6, rtol=1e-5)
        assert float(out.mean_probe[i, :, n:].abs().sum()) == 0.0
    plain_out = attention(q, k, v, AttnSpec(k_lengths=lengths))
    torch.testing.assert_close(out.out, plain_out.out)  # the product is unchanged
    assert plain_out.mean_probe is None


def test_packed_sequences_give_one_row_each():
    torch.manual_seed(1)
    lens = [5, 3, 7]
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    q, k, v = (torch.randn(15, 2, 16) for _ in range(3))
    out = attention(q, k, v, AttnSpec(cu_seqlens_q=cu, cu_seqlens_k=cu, probe_mean_query=True, scale=0.3))
    assert len(out.mean_probe) == len(lens)
    for i, n in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i + 1]))
        want = plain(q[s].transpose(0, 1), k[s].transpose(0, 1), n, n, 0.3)
        torch.testing.assert_close(out.mean_probe[i], want, atol=1e-6, rtol=1e-5)


def test_a_mean_query_cannot_be_causal():
    with pytest.raises(ValueError, match="causal"):
        AttnSpec(causal=True, probe_mean_query=True)
