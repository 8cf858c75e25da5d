"""Every fused-attention kernel specialisation compiles for sm_90 and sm_80, without a GPU.

The rest of the suite runs the kernels under the Triton interpreter, which compiles nothing.
Here ``vlm.kernels.offline.compile`` runs in a subprocess with ``TRITON_INTERPRET`` unset: it
routes the models' calls (and the kernel tests' and the benchmark's) as on a CUDA device, records
the launches of those that reach Triton, and compiles each unique specialisation with the triton
wheel's own compiler and ptxas: for sm_90 and sm_80, and for sm_90 only where only the kernel
tests launch it; fp32, fp16 and bf16. It fails on any compile error and on any
register spill of a kernel in a model or benchmark call (``benchmarks/compile_table.md`` has the
full table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

#: The model cases that SDPA expresses on CUDA (every other model case must reach Triton).
SDPA_CASES = ("ViT-B/16", "ViT-L/14-336", "LLaVA prefill", "pruned tokens")
#: Every dtype the kernels take.
DTYPES = ("fp32", "fp16", "bf16")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "vlm.kernels.offline.compile", "--workers", "2", "--dtypes", ",".join(DTYPES),
           "--test-caps", "90", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), (f"offline_compile wrote no report (exit {proc.returncode}):\n"
                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rep = json.loads(out.read_text())
    rep["returncode"] = proc.returncode
    print(json.dumps(rep["summary"]))
    return rep


def test_no_compile_errors(report):
    failed = [f"sm_{r['cap']} {r['kernel']} {r['dtype']} d={r['head_dim']} [{r['case']}]: {r['error'].splitlines()[0]}"
              for r in report["results"] if not r["ok"]]
    assert not failed, f"{len(failed)} compiles failed:\n" + "\n".join(failed[:30])


def test_forward_kernels_do_not_spill(report):
    spills = [f"sm_{r['cap']} {r['kernel']} {r['dtype']} d={r['head_dim']} [{r['case']}]: "
              f"{r['spill_stores']} B stored, {r['regs']} registers"
              for r in report["results"] if r["ok"] and r["group"] != "test" and r["spill_stores"] > 0
              and r["kernel"] in ("attn_fwd", "attn_topk_threshold", "attn_group_sums", "attn_probes")]
    assert not spills, "forward kernels spill registers:\n" + "\n".join(spills)


def test_backward_kernels_of_model_calls_do_not_spill(report):
    """The backward's tiles (``triton_attn_ops.backward_tile_shape``) keep dK/dV and dQ of every
    model and benchmark call within the register file; the kernel tests' exact-dot variants may spill."""
    spills = [f"sm_{r['cap']} {r['kernel']} {r['dtype']} d={r['head_dim']} [{r['case']}]: "
              f"{r['spill_stores']} B stored, {r['regs']} registers"
              for r in report["results"] if r["ok"] and r["group"] != "test" and r["spill_stores"] > 0
              and r["kernel"] in ("attn_bwd_dq", "attn_bwd_dkdv")]
    assert not spills, "backward kernels spill registers:\n" + "\n".join(spills)
    assert report["returncode"] == 0


def test_every_specialisation_for_both_targets_with_registers(report):
    """Model and benchmark specialisations compile for sm_90 and sm_80; those that only the kernel
    tests launch, for sm_90 (the GPUs the tests run on here; it keeps this test within minutes)."""
    s = report["summary"]
    assert s["caps"] == [90, 80] and s["test_caps"] == [90]
    per_spec: dict = {}
    for r in report["results"]:
        key = (r["kernel"], r["case"], r["dtype"], r["head_dim"], json.dumps(r["flags"], sort_keys=True))
        per_spec.setdefault(key, (r["group"], set()))[1].add(r["cap"])
    assert len(per_spec) == s["unique"]
    for key, (group, caps) in per_spec.items():
        assert caps == ({90} if group == "test" else {90, 80}), key
    assert all(r["regs"] > 0 for r in report["results"] if r["ok"])
    assert all(r["mma"] > 0 for r in report["results"] if r["ok"] and r["flags"]["DOT"] != "ieee")
    assert set(s["kernels"]) == {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "attn_topk_threshold",
                                 "attn_group_sums", "attn_probes"}


def test_routes_cover_the_issue_shapes(report):
    """Plain/padded/causal model calls go to SDPA; every structured one reaches the Triton kernel,
    in every dtype with head dims 32, 64 and 128."""
    assert report["summary"]["dtypes"] == list(DTYPES) and report["summary"]["head_dims"] == [32, 64, 128]
    grid = {f"{dt} d{d}" for dt in DTYPES for d in (32, 64, 128)}
    model = {c: r for c, r in report["routes"].items() if not c.startswith(("test", "bench"))}
    assert len(model) == 10
    compiled_cases = {c for r in report["results"] for c in r["cases"]}
    for case, routes in model.items():
        assert set(routes) == grid, case
        if case.startswith(SDPA_CASES):
            assert set(routes.values()) <= {"sdpa_flash", "sdpa_efficient"}, (case, routes)
        else:
            assert set(routes.values()) == {"triton"}, (case, routes)
            assert case in compiled_cases, case


def test_fp32_dots_use_tensor_cores_except_in_the_exact_tests(report):
    """fp32 model calls compile TF32 dots (tensor-core MMAs); the kernel tests' fp32 calls compile
    3xTF32, and some also the exact ``ieee`` (FMA) dots."""
    fp32 = [r for r in report["results"] if r["ok"] and r["dtype"] == "fp32"]
    assert {r["flags"]["DOT"] for r in fp32 if r["group"] == "model"} == {"tf32"}
    assert {r["flags"]["DOT"] for r in fp32 if r["group"] == "test"} == {"tf32x3", "ieee"}
    # tensor-core MMAs in every QK^T / PV of a TF32 kernel (an FMA dot emits none)
    assert all(r["mma"] >= 2 for r in fp32 if r["group"] == "model")
