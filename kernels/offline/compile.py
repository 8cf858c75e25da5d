"""Compile every fused-attention kernel specialisation for sm_90 and sm_80 *without a GPU*.

CI runs the kernels under the Triton interpreter, which compiles nothing: a kernel that the GPU
compiler rejects passes every interpreted test and crashes at a model's first attention call.
This module closes that gap on a CPU-only machine:

1. each case of ``vlm.kernels.offline.cases.cases`` (the models' shapes and specs, the kernel tests'
   flag combinations, the benchmark's forced-Triton calls) is routed by ``dispatch.choose_route`` as on a CUDA
   device; the calls routed to Triton run their real host code (``triton_attention`` -> custom
   ops -> ``_fwd_impl``/``_bwd_impl``) on CPU tensors, forward and backward;
2. every launch is recorded instead of run (``triton_attn_ops.LAUNCHER``), so the arguments,
   constexprs, ``num_warps`` and ``num_stages`` are the ones a GPU run would use;
3. launches are deduplicated by Triton's own binder key (constexprs, argument dtypes, pointer
   alignment, integer ``== 1`` / divisibility specialisation, options), and each unique
   specialisation is compiled per target by ``JITFunction.warmup`` under a fake driver that
   reports ``GPUTarget("cuda", CAP, 32)``, in a pool of worker processes;
4. the compile's own ``ptxas -v`` log (the ptxas bundled with the triton wheel) gives registers,
   spill bytes and stack; the PTX gives the count of tensor-core MMA instructions.

Triton reads ``TRITON_INTERPRET`` when ``triton.jit`` runs, so this must run in a process
where it is unset before ``vlm.kernels`` is imported. The compile table and the CI test::

    env -u TRITON_INTERPRET python -m vlm.kernels.offline.compile --table benchmarks/compile_table.md
    env -u TRITON_INTERPRET python -m vlm.kernels.offline.compile --test-caps 90 --json out.json

(``tests/kernels/test_offline_compile.py`` runs the second in a subprocess: every dtype and head
dim of the model cases for sm_90 and sm_80; specialisations that only the kernel tests launch are
compiled for sm_90 alone, to keep CI within minutes.)

Exit status 1 when any specialisation fails to compile or a forward kernel of a model or
benchmark case spills registers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

from vlm.kernels.offline.cases import DTYPES, GROUPS, HEAD_DIMS, TEST_FP32_DOT, Case, cases

#: The forward kernels (a spill of any kernel of a model or benchmark call fails the run; the
#: kernel tests' rarer flag combinations, e.g. exact fp32 ``ieee`` dots, are reported only).
FORWARD_KERNELS = ("attn_fwd", "attn_topk_threshold", "attn_group_sums", "attn_probes")
CAPS = (90, 80)


# ------------------------------------------------------------------------------------------------
# capture


@dataclasses.dataclass
class Launch:
    case: str
    group: str
    dtype: str
    head_dim: int
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict


class FakeDriver:
    """Just enough of Triton's driver for ``JITFunction.warmup`` to compile for ``sm_<cap>``.

    The device id is the capability, so each target gets its own binder and kernel cache.
    """

    def __init__(self, cap: int) -> None:
        self.set_cap(cap)

    def set_cap(self, cap: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cap, 32)

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cuda_route(q, k, v, spec, force_triton: bool = False) -> str:
    """``dispatch.choose_route`` for these CPU tensors as if they lived on an sm_80+ device."""
    from vlm.kernels import dispatch
    from vlm.kernels.triton_attention import supports_call

    return dispatch.choose_route(
        spec, device_type="cuda", dtype=q.dtype, head_dim=q.shape[-1], nq=q.shape[-2], nk=k.shape[-2],
        lengths_ok=dispatch._lengths_ok(spec), triton_ok=supports_call(q, k, v, spec), flash_capable=True,
        forced="triton" if force_triton else None)


def capture(selected: list[Case], dtypes=DTYPES, head_dims=HEAD_DIMS) -> tuple[list[Launch], dict]:
    """Run the host code of every (case, dtype, head dim) routed to Triton; record its launches.

    Returns the launches and ``{case: {"<dtype> d<d>": route}}``.
    """
    import torch

    from vlm.kernels import triton_attn_ops as ops
    from vlm.kernels.triton_attention import triton_attention

    launches: list[Launch] = []
    routes: dict[str, dict[str, str]] = {}
    where: dict = {}

    def record(kernel, grid, args, kwargs):
        launches.append(Launch(where["case"].name, where["case"].group, where["dtype"], where["d"], kernel,
                               grid, args, kwargs))

    old = ops.LAUNCHER
    ops.LAUNCHER = record
    try:
        for case in selected:
            model = case.group == "model"  # the dtype / head-dim filters narrow the model cases only
            for dt in (t for t in case.dtypes if t in dtypes or not model):
                for d in (x for x in case.head_dims if x in head_dims or not model):
                    where.update(case=case, dtype=dt, d=d)
                    q, k, v, spec = case.build(_torch_dtype(dt), d)
                    route = cuda_route(q, k, v, spec, force_triton=case.group != "model")
                    routes.setdefault(case.name, {})[f"{dt} d{d}"] = route
                    if route != "triton":
                        continue
                    saved = {name: getattr(ops, name) for name, _ in case.patch}
                    try:
                        for name, value in case.patch:
                            setattr(ops, name, value)
                        leaves = [t.requires_grad_(case.backward) for t in (q, k, v)]
                        out = triton_attention(*leaves, spec)
                        if case.backward:
                            loss = out.out.float().sum()
                            if out.lse.requires_grad:
                                loss = loss + torch.nan_to_num(out.lse, neginf=0.0).sum()
                            loss.backward()
                    finally:
                        for name, value in saved.items():
                            setattr(ops, name, value)
    finally:
        ops.LAUNCHER = old
    return launches, routes


def spec_key(launch: Launch, device: int) -> str:
    """Triton's own cache key of the launch (specialisation and options) for ``device``."""
    binder = launch.kernel.device_caches[device][4]
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    return f"{launch.kernel.__name__}|{specialization}|{options}"


# ------------------------------------------------------------------------------------------------
# compile


def ptxas_path() -> str:
    """The ptxas Triton compiles with (``TRITON_PTXAS_PATH`` or the wheel's own)."""
    import triton

    path = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"ptxas not found at {path}: the triton wheel ships it under "
                                "backends/nvidia/bin (reinstall triton) or set TRITON_PTXAS_PATH")
    return path


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a load-independent cost."""
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def compile_one(launch: Launch, cap: int, drv: FakeDriver) -> dict:
    """Compile one specialisation for ``sm_<cap>``; registers and spills from its ``ptxas -v``."""
    from triton import knobs

    drv.set_cap(cap)
    kw = launch.kwargs
    rec: dict = dict(kernel=launch.kernel.__name__, cap=cap, case=launch.case, group=launch.group,
                     dtype=launch.dtype, head_dim=launch.head_dim, num_warps=kw.get("num_warps"),
                     num_stages=kw.get("num_stages"),
                     flags={k: str(v) for k, v in config_of(launch).items() if v is not False})
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **kw)
    except Exception as e:  # noqa: BLE001 -- every compiler error is a result to report
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:4000], traceback=traceback.format_exc()[-4000:],
                   compile_s=round(time.perf_counter() - t0, 2))
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    rec["cpu_s"] = round(_cpu_seconds() - cpu0, 2)
    text = log.getvalue()
    regs, spill, stack = _REGS.search(text), _SPILL.search(text), _STACK.search(text)
    if regs is None or spill is None:
        rec.update(ok=False, error=f"no ptxas -v report in the compile log (a disk-cached kernel?): {text[-300:]!r}")
        return rec
    ptx = compiled.asm["ptx"]
    rec.update(ok=True, regs=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
               stack=int(stack.group(1)) if stack else 0, shared=int(compiled.metadata.shared),
               mma=ptx.count("mma.sync.aligned") + ptx.count("wgmma.mma_async.sync"),
               wgmma=ptx.count("wgmma.mma_async.sync"), cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"))
    return rec


_STATE: dict = {}


def _worker(task: tuple[int, int]) -> dict:
    index, cap = task
    rec = compile_one(_STATE["todo"][index], cap, _STATE["driver"])
    rec["cases"] = _STATE["users"][index]
    return rec


def config_of(launch: Launch) -> dict:
    """The launch's compile-time switches (its :class:`~vlm.kernels.triton_attn_args.Cfg`, plain values)."""
    from vlm.kernels.triton_attn_args import Cfg

    return next(a for a in launch.args if isinstance(a, Cfg)).plain()


def _cost(launch: Launch) -> float:
    """Rough compile cost, to start the long compiles first and keep the workers balanced."""
    cfg = config_of(launch)
    base = {"attn_topk_threshold": 4.0, "attn_bwd_dkdv": 2.0, "attn_bwd_dq": 1.6}.get(launch.kernel.__name__, 1.0)
    ieee = 3.0 if cfg["DOT"] == "ieee" else 1.0
    return base * ieee * cfg["HEAD_D"] * cfg["BLOCK_N"]


def run(caps=CAPS, dtypes=DTYPES, head_dims=HEAD_DIMS, groups=GROUPS, workers: int = 2, only: Optional[str] = None,
        log: Callable[[str], None] = print, test_caps=None) -> dict:
    """Capture, deduplicate and compile; returns ``{"results", "summary", "routes"}``.

    ``test_caps``: the targets of specialisations that only the kernel tests launch (default
    ``caps``); model and benchmark specialisations are compiled for every target of ``caps``.
    """
    test_caps = tuple(caps if test_caps is None else test_caps)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("offline_compile needs TRITON_INTERPRET unset before triton is imported "
                           "(env -u TRITON_INTERPRET python -m vlm.kernels.offline.compile)")
    ptxas_path()
    import torch
    from triton.runtime.driver import driver

    torch.set_num_threads(1)
    drv = FakeDriver(caps[0])
    driver.set_active(drv)
    from vlm.kernels import triton_attn_ops as ops

    if ops.INTERPRET:
        raise RuntimeError("vlm.kernels.triton_attn_ops was imported under TRITON_INTERPRET=1")
    selected = [c for c in cases(groups) if only is None or only in c.name]
    t0 = time.perf_counter()
    launches, routes = capture(selected, dtypes, head_dims)
    t_capture = time.perf_counter() - t0
    unique: dict[str, Launch] = {}
    users: dict[str, list[str]] = {}  # every case that launches the specialisation
    tested_only: dict[str, bool] = {}
    for launch in launches:
        key = spec_key(launch, caps[0])
        unique.setdefault(key, launch)
        tested_only[key] = tested_only.get(key, True) and launch.group == "test"
        if launch.case not in users.setdefault(key, []):
            users[key].append(launch.case)
    keys = sorted(unique, key=lambda key: _cost(unique[key]), reverse=True)
    todo = [unique[key] for key in keys]
    tasks = [(i, cap) for i, key in enumerate(keys) for cap in (test_caps if tested_only[key] else caps)]
    log(f"{len(launches)} launches from {len(selected)} cases ({t_capture:.1f}s); {len(todo)} unique "
        f"specialisations, {len(tasks)} compiles ({workers} workers)")
    _STATE.update(todo=todo, driver=drv, users=[users[key] for key in keys])
    t1 = time.perf_counter()
    results: list[dict] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            for rec in pool.imap_unordered(_worker, tasks):
                results.append(rec)
                log(_line(rec))
    else:
        for task in tasks:
            results.append(_worker(task))
            log(_line(results[-1]))
    results.sort(key=lambda r: (r["kernel"], r["dtype"], r["head_dim"], r["group"], r["case"], -r["cap"]))
    gated = [r for r in results if r["ok"] and r["kernel"] in FORWARD_KERNELS and r["group"] != "test"]
    gated_bwd = [r for r in results if r["ok"] and r["kernel"] not in FORWARD_KERNELS and r["group"] != "test"]
    summary = dict(
        launches=len(launches), unique=len(todo), compiles=len(results), cases=len(selected),
        capture_s=round(t_capture, 1), compile_wall_s=round(time.perf_counter() - t1, 1),
        compile_cpu_s=round(sum(r.get("cpu_s", 0.0) for r in results), 1), workers=workers, caps=list(caps),
        test_caps=list(test_caps), dtypes=list(dtypes), head_dims=list(head_dims),
        failed=sum(not r["ok"] for r in results), forward_spills=sum(r["spill_stores"] > 0 for r in gated),
        backward_spills=sum(r["spill_stores"] > 0 for r in gated_bwd),
        spilling=sum(r.get("spill_stores", 0) > 0 for r in results),
        kernels=sorted({r["kernel"] for r in results}),
        max_regs={k: max(r["regs"] for r in results if r["kernel"] == k and r["ok"])
                  for k in sorted({r["kernel"] for r in results if r["ok"]})},
    )
    return dict(results=results, summary=summary, routes=routes)


def _line(rec: dict) -> str:
    head = f"sm_{rec['cap']} {rec['kernel']:<20} {rec['dtype']} d={rec['head_dim']:<3} [{rec['case']}]"
    if not rec["ok"]:
        return f"FAIL {head}: {rec['error'].splitlines()[0][:300]}"
    return (f"ok   {head} regs={rec['regs']} spill={rec['spill_stores']}/{rec['spill_loads']} "
            f"smem={rec['shared']} mma={rec['mma']} {rec['compile_s']}s")


_FLAGS = ("VARLEN", "HAS_KLEN", "CAUSAL", "HAS_ALLOW", "HAS_SUBSET", "ALL_KEYS", "HAS_TOPK", "HAS_KG", "FIXED",
          "HAS_EPI", "WITH_DO", "SORT")


def table(report: dict) -> str:
    """Markdown: routes, a per-kernel summary and one row per specialisation with both targets."""
    s, results = report["summary"], report["results"]
    caps = s["caps"]
    out = [
        "# Offline compile table of the fused attention kernels",
        "",
        "Generated without a GPU by `env -u TRITON_INTERPRET python -m vlm.kernels.offline.compile --table "
        "benchmarks/compile_table.md`",
        "(see that module; `tests/kernels/test_offline_compile.py` runs the same in CI). Each case is routed as",
        "`vlm.kernels.attention` routes it on a CUDA device; the calls that reach the Triton kernel run their",
        "host code on CPU tensors, and every launch is compiled by `JITFunction.warmup` for",
        "`GPUTarget('cuda', CAP, 32)`. Registers per thread, spill stores/loads (bytes) and shared memory come",
        "from the compile's own `ptxas -v`; `mma` counts tensor-core MMA instructions in the PTX",
        "(`mma.sync` / `wgmma`; 0 means FMA dots). Model fp32 calls use TF32 dots; the kernel tests' fp32 calls",
        f"use `{TEST_FP32_DOT}` (as the compiled tests run them), and a few also exact `ieee` (FMA) dots.",
        "",
        f"**{s['unique']} unique specialisations, {s['compiles']} compiles "
        f"({'/'.join(f'sm_{c}' for c in caps)}; kernel-test-only ones for "
        f"{'/'.join(f'sm_{c}' for c in s['test_caps'])}): "
        f"{s['failed']} failed; {s['forward_spills']} forward-kernel and {s['backward_spills']} backward-kernel "
        "compiles of model/benchmark cases spill; "
        f"{s['spilling']} compiles spill in all.** {s['launches']} launches from {s['cases']} cases; capture "
        f"{s['capture_s']} s, compile {s['compile_wall_s']} s wall ({s['compile_cpu_s']} CPU-s) with "
        f"{s['workers']} worker processes.",
        "",
        "## Routes on a CUDA device",
        "",
        "| case | route (dtype, head dim) |",
        "|---|---|",
    ]
    for case, by in report["routes"].items():
        if case.startswith(("test", "bench")):
            continue  # the kernel tests and the benchmark call the Triton kernel directly
        grouped: dict[str, list[str]] = {}
        for where, route in by.items():
            grouped.setdefault(route, []).append(where)
        out.append(f"| {case} | " + "; ".join(f"**{r}**: {', '.join(w)}" for r, w in grouped.items()) + " |")
    out += ["", "The kernel tests' and the benchmark's calls go to the Triton kernel directly.", "",
            "## Per kernel", "",
            "| kernel | calls of | compiles | failed | max registers | compiles that spill | max spill stores (B) |",
            "|---|---|---|---|---|---|---|"]
    for kernel in s["kernels"]:
        for label, groups in (("models + benchmark", ("model", "bench")), ("kernel tests", ("test",))):
            rs = [r for r in results if r["kernel"] == kernel and r["group"] in groups]
            if not rs:
                continue
            ok = [r for r in rs if r["ok"]]
            out.append(f"| {kernel} | {label} | {len(rs)} | {len(rs) - len(ok)} | "
                       f"{max((r['regs'] for r in ok), default='-')} | {sum(r['spill_stores'] > 0 for r in ok)} | "
                       f"{max((r['spill_stores'] for r in ok), default='-')} |")

    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if not r["ok"]:
            return "**FAIL** " + r["error"].splitlines()[0][:80].replace("|", "/")
        return (f"ok {r['regs']} r, spill {r['spill_stores']}/{r['spill_loads']}, {r['shared'] // 1024} KiB, "
                f"{r['mma']} mma")

    rows: dict[tuple, dict] = {}
    for r in results:
        f = r["flags"]
        flags = ",".join(k.replace("HAS_", "").lower() for k in _FLAGS if f.get(k) == "True")
        if "TOPK_W" in f:
            flags += f",list{f['TOPK_W']}"
        tile = f"{f.get('BLOCK_M')}x{f.get('BLOCK_N')} w{r['num_warps']} s{r['num_stages']}"
        dot = f" {f['DOT']}" if r["dtype"] == "fp32" else ""
        key = (r["kernel"], r["dtype"] + dot, r["head_dim"], tile, flags.strip(","))
        row = rows.setdefault(key, {"cases": []})
        row[r["cap"]] = r
        if r["case"] not in row["cases"]:
            row["cases"].append(r["case"])
    out += ["", "## Specialisations", "",
            "| kernel | dtype | d | tile, warps, stages | flags | case | " + " | ".join(f"sm_{c}" for c in caps) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(caps)]
    for (kernel, dtype, d, tile, flags), row in sorted(rows.items()):
        out.append(f"| {kernel} | {dtype} | {d} | {tile} | {flags or '-'} | {row['cases'][0]} | "
                   + " | ".join(cell(row.get(c)) for c in caps) + " |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", default=",".join(map(str, CAPS)), help="compute capabilities, e.g. 90,80")
    ap.add_argument("--test-caps", default=None,
                    help="targets of the specialisations only the kernel tests launch (default: --caps)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="of the model cases")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="of the model cases")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"case groups among {GROUPS}")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (fork)")
    ap.add_argument("--only", default=None, help="only cases whose name contains this")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--table", default=None, help="write the markdown compile table here")
    args = ap.parse_args(argv)
    # A fresh cache: a kernel found on disk is not compiled again and leaves no ptxas log.
    cache = tempfile.mkdtemp(prefix="vlm_offline_compile_")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        report = run(tuple(int(c) for c in args.caps.split(",")), tuple(args.dtypes.split(",")),
                     tuple(int(d) for d in args.head_dims.split(",")), tuple(args.groups.split(",")),
                     args.workers, args.only,
                     test_caps=None if args.test_caps is None else tuple(int(c) for c in args.test_caps.split(",")))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    s = report["summary"]
    print(json.dumps(s), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table(report))
    return 1 if s["failed"] or s["forward_spills"] or s["backward_spills"] else 0


if __name__ == "__main__":
    sys.exit(main())
