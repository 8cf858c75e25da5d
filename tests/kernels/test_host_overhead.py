"""Host work per fused-attention call: counted in aten ops, with the kernel launches stubbed out.

Every block of a tower passes the same group, subset and length tensors, so the mask layout
(tile lists, subset ranks, ``allow`` bit words) is built by the first call of a pass and reused
by the others (``triton_attn_layout.LAYOUT_CACHE``). What is left per call is the output
allocations and the backward's ``D = rowsum(dO * O)``. Before the cache a TCPA call cost 145
aten ops forward and 153 backward. The shapes are the ViT-B/16 TCPA call of the offline compile
cases; the launcher is replaced, so nothing runs on a device and no kernel is interpreted.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlm.kernels.offline import cases as offline_compile_cases
from vlm.kernels import triton_attn_layout, triton_attn_ops as ops
from vlm.kernels.triton_attention import triton_attention


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """Count the aten ops inside the two custom ops' host code; launches only recorded."""
    seen: dict[str, list[str]] = {}
    launches: list = []

    def wrap(name):
        orig = getattr(ops, name)

        def counting(*args):
            with _CountOps() as c:
                out = orig(*args)
            seen[name] = c.ops
            return out
        monkeypatch.setattr(ops, name, counting)

    wrap("_fwd_impl")
    wrap("_bwd_impl")
    monkeypatch.setattr(ops, "LAUNCHER", lambda kernel, grid, args, kwargs: launches.append(kernel.__name__))
    triton_attn_layout.LAYOUT_CACHE.clear()
    return seen, launches


def _case(name):
    return next(c for c in offline_compile_cases._model_cases() if c.name.startswith(name))


@pytest.mark.parametrize("name,fwd_max,bwd_max", [("all_keys + row_subset", 12, 20), ("segmented, learned", 26, 16),
                                                  ("top-k 105", 10, 24)])
def test_warm_calls_do_little_host_work(counted, name, fwd_max, bwd_max):
    seen, launches = counted
    q, k, v, spec = _case(name).build(torch.float32, 64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    per_call = []
    for _ in range(3):  # the blocks of one pass: same spec tensors
        triton_attention(q, k, v, spec).out.sum().backward()
        per_call.append((len(seen["_fwd_impl"]), len(seen["_bwd_impl"])))
    first, warm = per_call[0], per_call[1:]
    assert all(w == warm[0] for w in warm)
    assert warm[0][0] <= fwd_max and warm[0][1] <= bwd_max, (name, per_call)
    assert first[0] > warm[0][0]  # the first call of a pass builds the layout
    assert "attn_fwd" in launches and "attn_bwd_dq" in launches and "attn_bwd_dkdv" in launches


def test_new_mask_tensors_build_a_new_layout(counted):
    seen, _ = counted
    q, k, v, spec = _case("all_keys + row_subset").build(torch.float32, 64)
    triton_attention(q, k, v, spec)
    built = len(seen["_fwd_impl"])
    triton_attention(q, k, v, spec)
    warm = len(seen["_fwd_impl"])
    fresh = spec.replace(q_groups=spec.q_groups.clone(), row_subset=spec.row_subset.clone())
    triton_attention(q, k, v, fresh)
    assert warm < built and len(seen["_fwd_impl"]) == built  # a new pass's tensors: built again


@torch.no_grad()
def test_packed_prefill_layers_share_one_layout(counted, monkeypatch):
    """The packed LLaVA prefill (``vlm.towers.packed_prefill``) hands every decoder layer the same
    ``cu_seqlens`` tensor: the first layer's varlen call builds the layout, the others reuse it."""
    from transformers import LlamaConfig, LlamaModel

    import vlm.towers.packed_prefill as packed

    seen, launches = counted
    per_layer: list[int] = []

    def counting_attention(q, k, v, spec):
        out = triton_attention(q, k, v, spec)
        per_layer.append(len(seen["_fwd_impl"]))
        return out

    monkeypatch.setattr(packed, "attention", counting_attention)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=16)
    cfg._attn_implementation = "sdpa"
    lm = LlamaModel(cfg).eval()
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    packed.packed_prefill(lm, torch.randn(2, 40, 128), mask, pos)
    assert len(per_layer) == 4 and launches == ["attn_fwd"] * 4
    assert per_layer[0] > per_layer[1] and per_layer[1:] == [per_layer[1]] * 3 and per_layer[1] <= 10, per_layer
