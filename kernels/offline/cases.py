"""The attention calls that ``vlm.kernels.offline.compile`` captures and compiles, as data.

Three groups (:data:`GROUPS`): the models' calls with the specs the project's hooks build
(``prompts/``, ``pruning/``, the LLaVA prefills), routed as on a CUDA device; the kernel tests'
flag combinations (``tests/kernels/test_triton_attention.py``), forced to the Triton kernel with
the compiled tests' fp32 dot precision; and ``benchmarks/attention.py``'s forced-Triton calls.
Each :class:`Case` builds ``(q, k, v, spec)`` on CPU tensors for a dtype and head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

DTYPES = ("fp32", "fp16", "bf16")
HEAD_DIMS = (32, 64, 128)
#: Case groups: the models' calls (routed as on CUDA), the kernel tests' calls (forced to the
#: Triton kernel, with the fp32 dot precision the compiled tests use) and the benchmark's.
GROUPS = ("model", "test", "bench")
#: ``triton_attn_ops.FP32_DOT`` of the compiled kernel tests (``tests/kernels/test_triton_attention.py``).
TEST_FP32_DOT = "tf32x3"
#: Test cases also compiled with exact (``ieee``, FMA) dots, the option for bit-level checks.
IEEE_TESTS = ("fixed gate, tensor + allow + causal", "top-k + all_keys")


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: ``build(torch_dtype, head_dim)`` returns ``(q, k, v, spec)``.

    ``patch``: ``triton_attn_ops`` attributes set while it runs (as a test's monkeypatch does).
    """

    name: str
    build: Callable[[Any, int], tuple]
    group: str = "model"
    dtypes: tuple = DTYPES
    head_dims: tuple = HEAD_DIMS
    backward: bool = True
    patch: tuple = ()


def _qkv(b: int, h: int, nq: int, nk: int, d: int, dtype, seed: int = 0) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(seed)
    if b == 0:  # packed varlen: [T, H, D]
        return tuple(torch.randn(n, h, d, generator=gen).to(dtype) for n in (nq, nk, nk))
    return tuple(torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (nq, nk, nk))


def _ints(high: int, shape: tuple, seed: int):
    import torch

    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _bits(shape: tuple, seed: int):
    """Random int64 words using all 64 bits (the sign bit too), as the kernel tests draw them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 2 ** 32, shape, generator=gen, dtype=torch.int64)
    hi = torch.randint(0, 2 ** 32, shape, generator=gen, dtype=torch.int64)
    return (hi << 32) | lo


def _tcpa_groups():
    """ViT-B/16 with a role-split prompt pool: keys CLS + 2x18 prompts + 196 patches, queries CLS + patches."""
    import torch

    kg = torch.cat([torch.zeros(1), torch.full((18,), 1), torch.full((18,), 2), torch.full((196,), 3)]).long()
    qg = torch.cat([torch.zeros(1), torch.full((196,), 3)]).long()
    allow = torch.zeros(4, 4, dtype=torch.bool)
    allow[0, [0, 1, 3]] = True
    allow[3, [0, 2, 3]] = True
    return qg, kg, allow


def _dpl_groups():
    """Segmented groups on ViT-B/16 with 16 prompts: CLS, prompts, patches; prompts do not see patches."""
    import torch

    g = torch.cat([torch.zeros(1), torch.ones(16), torch.full((196,), 2)]).long()
    return g, g, torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def _model_cases() -> list[Case]:
    """The issue's shapes, with the specs the project's hooks build (``prompts/``, ``pruning/``)."""
    import torch

    from vlm.kernels import AttnSpec

    def pool(dt, d):  # groups + row_subset over a prompt pool, no allow matrix
        qg, kg, _ = _tcpa_groups()
        return (*_qkv(2, 12, 197, 233, d, dt), AttnSpec(
            q_groups=qg, k_groups=kg, subset_group=2, row_subset=_ints(2 ** 18, (2, 197), 1),
            normalize="all_keys", probe_rows=torch.tensor([0])))

    def segmented(gate):  # vision tower: groups + allow, one gate per key group
        def build(dt, d):
            qg, kg, allow = _dpl_groups()
            g = gate() if callable(gate) else gate
            return (*_qkv(2, 12, 213, 213, d, dt),
                    AttnSpec(q_groups=qg, k_groups=kg, allow=allow, normalize="segmented", segment_gate=g))
        return build

    cu = torch.tensor([0, 100, 350, 600], dtype=torch.int32)
    return [
        Case("ViT-B/16 + 16 prompts", lambda dt, d: (*_qkv(2, 12, 213, 213, d, dt), AttnSpec())),
        Case("ViT-L/14-336 + 8 prompts, CLS probe rows",
             lambda dt, d: (*_qkv(2, 16, 585, 585, d, dt), AttnSpec(probe_rows=torch.tensor([0])))),
        Case("LLaVA prefill, causal", lambda dt, d: (*_qkv(1, 32, 700, 700, d, dt), AttnSpec(causal=True))),
        Case("pruned tokens, k_lengths + CLS probe rows", lambda dt, d: (
            *_qkv(2, 12, 120, 120, d, dt), AttnSpec(k_lengths=torch.tensor([120, 77]), probe_rows=torch.tensor([0])))),
        Case("all_keys + row_subset + CLS probe", pool),
        Case("segmented, constant gate", segmented(0.9)),
        Case("segmented, learned gate", segmented(lambda: torch.rand(2, 12, 213, 3).requires_grad_())),
        Case("top-k 105 + context epilogue", lambda dt, d: (
            *_qkv(2, 6, 210, 210, d, dt), AttnSpec(topk=105, epilogue_add=torch.randn(2, 6, d).to(dt)))),
        Case("top-k 200 (k > 128) + epilogue", lambda dt, d: (
            *_qkv(1, 6, 300, 300, d, dt), AttnSpec(topk=200, epilogue_add=torch.randn(1, 6, d).to(dt)))),
        Case("varlen causal (packed prefill)", lambda dt, d: (
            *_qkv(0, 8, 600, 600, d, dt), AttnSpec(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True))),
    ]


def _test_cases() -> list[Case]:
    """The flag combinations of ``tests/kernels/test_triton_attention.py``: fp32 (unless named) with
    the tests' dot precision (:data:`TEST_FP32_DOT`); one head dim (32) per combination, since the
    model cases cover the head dims, except for the plain calls, which the tests run at every head
    dim. :data:`IEEE_TESTS` are compiled with exact dots as well."""
    import torch

    from vlm.kernels import AttnSpec

    allow2 = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    tests: list[tuple[str, Callable, dict]] = []

    def add(name, build, **kw):
        tests.append((name, build, kw))

    add("plain, d16 to d128", lambda dt, d: (*_qkv(1, 1, 20, 20, d, dt), AttnSpec()), head_dims=(16, 32, 64, 128))
    for nq, nk in ((24, 24), (17, 40), (40, 17)):
        add(f"causal {nq}x{nk}", lambda dt, d, nq=nq, nk=nk: (*_qkv(2, 1, nq, nk, d, dt), AttnSpec(causal=True)))
    add("causal 1x1 (H=1)", lambda dt, d: (*_qkv(1, 1, 1, 1, d, dt), AttnSpec(causal=True)))
    add("k_lengths with a zero", lambda dt, d: (*_qkv(3, 2, 19, 37, d, dt),
                                                AttnSpec(k_lengths=torch.tensor([37, 5, 0]))))
    add("groups + allow, batched", lambda dt, d: (*_qkv(2, 2, 30, 45, d, dt), AttnSpec(
        q_groups=_ints(3, (2, 30), 3), k_groups=_ints(3, (2, 45), 4), allow=_ints(2, (3, 3), 30).bool())))
    for norm in ("softmax", "all_keys"):
        add(f"tile classes, {norm}", lambda dt, d, norm=norm: (*_qkv(1, 1, 134, 134, d, dt), AttnSpec(
            q_groups=torch.cat([torch.zeros(64), torch.ones(70)]).long(),
            k_groups=torch.cat([torch.zeros(64), torch.ones(64), torch.full((6,), 2)]).long(),
            allow=torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool), normalize=norm)))
        add(f"row_subset one word, {norm}", lambda dt, d, norm=norm: (*_qkv(2, 2, 21, 33, d, dt), AttnSpec(
            q_groups=torch.zeros(21, dtype=torch.long),
            k_groups=torch.cat([torch.zeros(5), torch.ones(18), torch.zeros(10)]).long(),
            allow=torch.ones(1, 2, dtype=torch.bool), subset_group=1, row_subset=_bits((2, 21), 6), normalize=norm)))
        add(f"row_subset two words, no allow, {norm}", lambda dt, d, norm=norm: (*_qkv(1, 2, 16, 80, d, dt), AttnSpec(
            q_groups=torch.zeros(16, dtype=torch.long), k_groups=torch.cat([torch.zeros(10), torch.ones(70)]).long(),
            subset_group=1, row_subset=_bits((1, 16, 2), 7), normalize=norm)))
    add("masked rows + epilogue", lambda dt, d: (*_qkv(2, 2, 20, 23, d, dt), AttnSpec(
        q_groups=torch.tensor([0, 1] * 10), k_groups=_ints(2, (23,), 5),
        allow=torch.tensor([[0, 0], [1, 1]], dtype=torch.bool),
        epilogue_add=torch.randn(2, 2, d).to(dt))))
    add("all_keys, causal, k_lengths, subset", lambda dt, d: (*_qkv(2, 2, 26, 31, d, dt), AttnSpec(
        q_groups=_ints(2, (2, 26), 8), k_groups=_ints(2, (2, 31), 9), allow=allow2, subset_group=1,
        row_subset=_bits((2, 26), 10), normalize="all_keys", causal=True, k_lengths=torch.tensor([31, 20]))))
    add("segmented exact gate", lambda dt, d: (*_qkv(2, 2, 40, 40, d, dt), AttnSpec(
        q_groups=torch.zeros(40, dtype=torch.long), k_groups=_ints(3, (40,), 11), normalize="segmented")))
    seg = dict(q_groups=torch.zeros(2, 29, dtype=torch.long), k_groups=_ints(3, (2, 35), 12), normalize="segmented",
               k_lengths=torch.tensor([35, 12]))
    add("fixed gate, float", lambda dt, d: (*_qkv(2, 2, 29, 35, d, dt), AttnSpec(**seg, segment_gate=0.7)))
    add("fixed gate, tensor + allow + causal", lambda dt, d: (*_qkv(2, 2, 29, 35, d, dt), AttnSpec(
        **seg, segment_gate=torch.rand(1, 2, 1, 3), allow=torch.tensor([[1, 1, 0]], dtype=torch.bool), causal=True)))
    for k in (1, 5, 29):
        add(f"top-k {k}", lambda dt, d, k=k: (*_qkv(2, 2, 30, 30, d, dt), AttnSpec(topk=k)))
    grp = dict(q_groups=_ints(2, (24,), 15), k_groups=_ints(2, (40,), 16), allow=allow2)
    add("top-k 7", lambda dt, d: (*_qkv(1, 2, 24, 40, d, dt), AttnSpec(topk=7, scale=0.25)))
    add("top-k + groups, causal", lambda dt, d: (*_qkv(1, 2, 24, 40, d, dt), AttnSpec(topk=6, causal=True, **grp)))
    add("top-k + all_keys", lambda dt, d: (*_qkv(1, 2, 24, 40, d, dt), AttnSpec(topk=6, normalize="all_keys", **grp)))
    add("top-k + fixed gate", lambda dt, d: (*_qkv(1, 2, 24, 40, d, dt), AttnSpec(
        topk=6, normalize="segmented", segment_gate=0.5, **grp)))
    add("top-k 70 (128-wide list)", lambda dt, d: (*_qkv(1, 1, 24, 90, d, dt), AttnSpec(topk=70)))
    for k in (9, 70):
        add(f"top-k {k}, sort merge, BLOCK_M=16", lambda dt, d, k=k: (*_qkv(1, 1, 16, 100, d, dt), AttnSpec(
            topk=k, causal=k == 9)), backward=False, patch=(("BLOCK_M", 16),))
    add("epilogue, causal", lambda dt, d: (*_qkv(2, 2, 17, 23, d, dt), AttnSpec(
        epilogue_add=torch.randn(2, 2, d).to(dt), causal=True)))
    for norm in ("softmax", "all_keys", "segmented"):
        add(f"probe rows + top-k + k_lengths, {norm}", lambda dt, d, norm=norm: (*_qkv(2, 2, 30, 37, d, dt), AttnSpec(
            q_groups=_ints(2, (2, 30), 18), k_groups=_ints(2, (2, 37), 17),
            allow=torch.tensor([[1, 1], [0, 1]], dtype=torch.bool),
            normalize=norm, probe_rows=torch.tensor([0, 29, 7]), k_lengths=torch.tensor([37, 30]), topk=20,
            segment_gate=torch.tensor([0.3, 0.9]) if norm == "segmented" else None)))
    cuq = torch.tensor([0, 1, 18, 18, 48], dtype=torch.int32)
    cuk = torch.tensor([0, 9, 26, 30, 66], dtype=torch.int32)
    vl = dict(cu_seqlens_q=cuq, cu_seqlens_k=cuk, q_groups=_ints(2, (48,), 20), k_groups=_ints(2, (66,), 21),
              allow=allow2, subset_group=1, row_subset=_bits((48,), 22))
    add("varlen causal", lambda dt, d: (*_qkv(0, 2, 48, 66, d, dt),
                                        AttnSpec(cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=True)))
    add("varlen groups + subset + epilogue", lambda dt, d: (*_qkv(0, 2, 48, 66, d, dt), AttnSpec(
        **vl, epilogue_add=torch.randn(4, 2, d).to(dt))))
    add("varlen all_keys + top-k", lambda dt, d: (*_qkv(0, 2, 48, 66, d, dt), AttnSpec(
        **vl, epilogue_add=torch.randn(4, 2, d).to(dt), normalize="all_keys", topk=5)))
    add("varlen fixed gate", lambda dt, d: (*_qkv(0, 2, 48, 66, d, dt), AttnSpec(
        **{k: v for k, v in vl.items() if k not in ("subset_group", "row_subset")}, normalize="segmented",
        segment_gate=0.25)))
    add("varlen probes + top-k", lambda dt, d: (*_qkv(0, 2, 48, 62, d, dt), AttnSpec(**{
        **vl, "k_groups": _ints(2, (62,), 23), "cu_seqlens_q": torch.tensor([0, 1, 18, 48], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 9, 26, 62], dtype=torch.int32), "probe_rows": torch.tensor([0]), "topk": 4,
        "epilogue_add": torch.randn(3, 2, d).to(dt)})))
    low = dict(q_groups=_ints(2, (33,), 23), k_groups=_ints(2, (41,), 24), allow=allow2)
    add("groups + causal + epilogue, 16-bit", lambda dt, d: (*_qkv(2, 2, 33, 41, d, dt), AttnSpec(
        **low, causal=True, epilogue_add=torch.randn(2, 2, d).to(dt))), dtypes=("fp16", "bf16"), head_dims=(64,))
    add("groups + all_keys, 16-bit", lambda dt, d: (*_qkv(1, 2, 33, 41, d, dt), AttnSpec(**low, normalize="all_keys")),
        dtypes=("fp16", "bf16"), head_dims=(64,))
    for n in (1, 17, 130, 197, 233):
        add(f"odd length {n}", lambda dt, d, n=n: (*_qkv(1, 1, n, n, d, dt), AttnSpec(causal=n % 2 == 1)))
    add("all_keys + row_subset 197x233, d32", lambda dt, d: (*_qkv(1, 1, 197, 233, d, dt), AttnSpec(
        **dict(zip(("q_groups", "k_groups", "allow"), _tcpa_groups())), subset_group=2,
        row_subset=_bits((1, 197), 25) & 0x3FFFF, normalize="all_keys", probe_rows=torch.tensor([0]))))
    out = []
    for name, build, kw in tests:
        kw.setdefault("dtypes", ("fp32",))
        kw.setdefault("head_dims", (32,))
        patch = (("FP32_DOT", TEST_FP32_DOT),) + kw.pop("patch", ())
        out.append(Case("test: " + name, build, group="test", patch=patch, **kw))
        if name in IEEE_TESTS:  # the exact-dot option compiles too (FMA dots: other layouts)
            out.append(dataclasses.replace(out[-1], name=f"test (ieee): {name}",
                                           patch=(("FP32_DOT", "ieee"),) + patch[1:]))
    return out


def _bench_cases() -> list[Case]:
    """``benchmarks/attention.py`` calls ``triton_attention`` directly, plain specs included."""
    import torch

    from vlm.kernels import AttnSpec

    def case(name, build, d):
        return Case("bench: " + name, build, group="bench", dtypes=("bf16",), head_dims=(d,))

    return [
        case("dense / ViT plain", lambda dt, d: (*_qkv(4, 16, 2048, 2048, d, dt), AttnSpec()), 64),
        case("LLaVA prefill causal", lambda dt, d: (*_qkv(1, 32, 1500, 1500, d, dt), AttnSpec(causal=True)), 128),
        case("ViT-L/14-336 probe_rows=[0]",
             lambda dt, d: (*_qkv(8, 16, 577, 577, d, dt), AttnSpec(probe_rows=torch.tensor([0]))), 64),
    ]


def cases(groups=GROUPS) -> list[Case]:
    """Every case of the requested groups (see :data:`GROUPS`)."""
    found = {"model": _model_cases, "test": _test_cases, "bench": _bench_cases}
    return [c for g in groups for c in found[g]()]
