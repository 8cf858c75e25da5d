"""Packed LLM prefill (``vlm.towers.packed_prefill``): the varlen attention's caller.

The packed run must equal the padded one at every real token (forward, gradients, greedy tokens),
its attention must see the samples as packed sequences (one varlen call per layer, the samples'
lengths in ``cu_seqlens``), the fused Triton varlen kernel must run it (interpreter here, compiled
in ``test_offline_compile``'s "varlen causal (packed prefill)" case), and misuse fails clearly.
"""

from __future__ import annotations

import os

import pytest
import torch

import vlm.towers.packed_prefill as packed_module
from tests.llava.tiny import pad_batch
from vlm import pruning
from vlm.towers.llava import LlavaRunner
from vlm.towers.packed_prefill import ATTN_IMPLEMENTATION, PackedLayout, packed_prefill

ATOL = 1e-5


def tiny_llama(heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=64, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaModel(cfg).eval()


def ragged(lengths: list[int], length: int, side: str, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """embeds, mask and per-sample position ids of a padded batch with these sample lengths."""
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        mask[i, sl] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0).masked_fill(mask == 0, 1)
    torch.manual_seed(2)
    return torch.randn(len(lengths), length, dim), mask, pos


def test_layout_packs_the_real_tokens_in_batch_order():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    layout = PackedLayout.from_mask(mask)
    assert layout.cu_seqlens.tolist() == [0, 3, 8, 9] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_len == 5
    x = torch.arange(15.0).view(3, 5, 1)
    assert layout.pack(x)[0, :, 0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 14]
    back = layout.unpack(layout.pack(x))
    assert torch.equal(back, x * mask[..., None])
    heads = torch.randn(1, 2, 9, 4)
    assert torch.equal(layout.unpack_heads(heads)[1, :, :, :], heads[0, :, 3:8])


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_attention_sees_one_varlen_call_per_layer(model, batch, side, monkeypatch):
    seqs, pix = batch
    calls = []

    def spy(q, k, v, spec):
        calls.append((tuple(q.shape), tuple(k.shape), spec.cu_seqlens_q.tolist(), spec.cu_seqlens_k.tolist(),
                      spec.causal, spec.k_lengths))
        return real(q, k, v, spec)

    real = packed_module.attention
    monkeypatch.setattr(packed_module, "attention", spy)
    ids, mask = pad_batch(seqs, side)
    _, inputs = LlavaRunner(model, packed_prefill=True)(ids, pix, mask, padding_side=side)
    lengths = inputs.attention_mask.sum(1).tolist()
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    heads = model.config.text_config.num_attention_heads
    head_dim = model.config.text_config.hidden_size // heads
    total = sum(lengths)
    expected = ((total, heads, head_dim), (total, heads, head_dim), cu, cu, True, None)
    assert calls == [expected] * model.config.text_config.num_hidden_layers
    assert total < inputs.attention_mask.numel()  # the padding rows are not run
    assert model.config.text_config._attn_implementation == "sdpa"  # restored after the call


@pytest.mark.parametrize("pruner", [("vtc_cls", dict(num_tokens=6, start_layer=0)), ("flowcut", dict(num_tokens=5))],
                         ids=lambda p: p[0])
@torch.no_grad()
def test_packed_equals_padded_with_a_vision_pruner(model, batch, pruner):
    seqs, pix = batch
    ids, mask = pad_batch(seqs, "left")
    hooks = [pruning.create(pruner[0], **pruner[1])]
    padded, inputs = LlavaRunner(model)(ids, pix, mask, hooks, padding_side="left")
    packed, _ = LlavaRunner(model, packed_prefill=True)(ids, pix, mask, hooks, padding_side="left")
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(packed[valid], padded[valid], atol=ATOL, rtol=1e-5)
    assert bool((packed[~valid] == 0).all())  # padding rows hold zeros, not another sample's values
    a = LlavaRunner(model).generate(ids, pix, mask, hooks, max_new_tokens=5)
    b = LlavaRunner(model, packed_prefill=True).generate(ids, pix, mask, hooks, max_new_tokens=5)
    assert torch.equal(a.tokens, b.tokens)


_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not _GPU,
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 exported before Python starts")
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_triton_varlen_kernel_runs_the_packed_prefill(side, kv_heads, monkeypatch):
    """Forced to the Triton backend (interpreted on CPU), forward and input gradients of the packed
    decoder equal the padded SDPA decoder's at every real token."""
    monkeypatch.setenv("VLM_ATTENTION_BACKEND", "triton")  # an unsupported call raises instead of falling back
    device = "cuda" if _GPU else "cpu"
    lm = tiny_llama(kv_heads=kv_heads).to(device)
    x, mask, pos = (t.to(device) for t in ragged([20, 13, 7], 20, side, lm.config.hidden_size))
    x_ref, x_packed = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = lm(inputs_embeds=x_ref, attention_mask=mask, position_ids=pos).last_hidden_state
    out = packed_prefill(lm, x_packed, mask, pos)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    weight = torch.randn_like(ref) * valid[..., None]
    (ref * weight).sum().backward()
    (out * weight).sum().backward()
    torch.testing.assert_close(x_packed.grad[valid], x_ref.grad[valid], atol=2e-5, rtol=1e-4)
    assert bool((x_packed.grad[~valid] == 0).all())


@torch.no_grad()
def test_cache_is_repadded_for_decoding():
    from transformers import DynamicCache

    lm = tiny_llama()
    x, mask, pos = ragged([9, 4], 9, "left", lm.config.hidden_size)
    ref_cache, cache = DynamicCache(config=lm.config), DynamicCache(config=lm.config)
    lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=ref_cache, use_cache=True)
    packed_prefill(lm, x, mask, pos, cache)
    valid = mask.bool()
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        for r, c in ((ref_layer.keys, layer.keys), (ref_layer.values, layer.values)):
            assert c.shape == r.shape
            torch.testing.assert_close(c.transpose(1, 2)[valid], r.transpose(1, 2)[valid], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fills an empty cache"):
        packed_prefill(lm, x, mask, pos, cache)


def test_implementation_is_restored_when_the_prefill_fails(monkeypatch):
    lm = tiny_llama()
    x, mask, pos = ragged([5, 3], 5, "right", lm.config.hidden_size)

    def boom(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(packed_module, "attention", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        packed_prefill(lm, x, mask, pos)
    assert lm.config._attn_implementation == "sdpa"


def test_varlen_implementation_without_packing_is_a_clear_error():
    lm = tiny_llama()
    packed_module.register()
    x, mask, pos = ragged([5, 3], 5, "right", lm.config.hidden_size)
    with packed_module.attention_implementation(lm, ATTN_IMPLEMENTATION):
        with pytest.raises(ValueError, match="packed sequences only.*packed_prefill=True"):
            lm(inputs_embeds=x, attention_mask=mask, position_ids=pos)
        cu = torch.tensor([0, 5, 8], dtype=torch.int32)
        with pytest.raises(ValueError, match="one row of all samples' tokens"):  # a padded batch, not packed
            lm(inputs_embeds=x, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
