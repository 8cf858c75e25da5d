#!/usr/bin/env bash
# One prepared GPU check of vlm's attention backends, for whoever has a CUDA device (an H100/H200
# needs about 6-8 minutes). Run from the repository root:
#
#     bash scripts/gpu_check.sh              # results in $TMPDIR/vlm_gpu_check (OUT=... to change)
#
# Steps, each under its own timeout and logging as it goes (a step cut short keeps its partial
# output; the summary says which):
#   1. env.txt          GPU, driver, torch / triton / cuDNN versions
#   2. tests.log/.xml   tests/kernels compiled on the device (TRITON_INTERPRET unset), without the
#                       offline compile test (it needs no GPU)
#   3. smoke.log        model-shaped calls through vlm.kernels.attention, fwd+bwd in bf16 against
#                       the fp32 reference, with the route each call took
#   4. bench_*.log      benchmarks/attention.py one case at a time (--case), so that a slow or
#      attention.md     failing case costs only itself; attention.md collects the table rows
# summary.md lists every step's status and time, then the tables.
#
# Knobs (environment): OUT, PYTHON (default .venv/bin/python, else python3), BUDGET_S (whole run,
# default 460), TESTS_S (180), SMOKE_S (90), CASE_S (60 per benchmark case), BENCH_REPS (5),
# CASES (benchmark case keys, default: all of `benchmarks/attention.py --list`).
set -u -o pipefail

if [ ! -f kernels/triton_attn_kernels.py ] || [ ! -f benchmarks/attention.py ]; then
    echo "run from the vlm repository root" >&2
    exit 2
fi
OUT="${OUT:-${TMPDIR:-/tmp}/vlm_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
unset TRITON_INTERPRET VLM_ATTENTION_BACKEND
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/triton_cache}"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-460}"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
limit() {  # limit WANTED: the step's timeout, never past the budget (at least 10 s)
    local l; l=$(left)
    (( l > $1 )) && l=$1
    (( l < 10 )) && l=10
    echo "$l"
}
say() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME SECONDS LOG command...
    local name=$1 secs=$2 log=$3 t0 rc status
    shift 3
    t0=$(date +%s)
    timeout --kill-after=10 "$secs" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMEOUT after ${secs}s (partial output kept)" ;;
        *) status="exit $rc" ;;
    esac
    say "- $name: $status, $(( $(date +%s) - t0 ))s, \`$(basename "$log")\`"
    return $rc
}

: > "$SUMMARY"
say "# vlm GPU check, $(date -u +%FT%TZ)"
say ""
{
    nvidia-smi || true
    "$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability())
EOF
} > "$OUT/env.txt" 2>&1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "- no CUDA device visible to torch (see env.txt): nothing to check"
    exit 4
fi
say "- device: $("$PY" -c "import torch; print(torch.cuda.get_device_name(), 'sm_%d%d' % torch.cuda.get_device_capability())")"

step "kernel tests, compiled" "$(limit "${TESTS_S:-180}")" "$OUT/tests.log" \
    "$PY" -m pytest tests/kernels -q -rfE -p no:cacheprovider --durations=10 \
    --ignore=tests/kernels/test_offline_compile.py --junitxml="$OUT/tests.xml"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/  - /' >> "$SUMMARY"

step "smoke: model-shaped calls, bf16 fwd+bwd vs fp32 reference" "$(limit "${SMOKE_S:-90}")" "$OUT/smoke.log" \
    "$PY" - <<'EOF'
import torch
from vlm.kernels import AttnSpec, attention, dispatch, reference_attention

dev = torch.device("cuda")
torch.manual_seed(0)


def groups(*sizes):
    return torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)]).long().to(dev)


tcpa_k = groups(1, 18, 18, 196)
tcpa_q = torch.cat([tcpa_k[:1], tcpa_k[-196:]])
dpl = groups(1, 16, 196)
cases = {
    "ViT-B/16 plain d64": ((2, 12, 213, 213, 64), AttnSpec()),
    "ViT-L/14-336 + CLS probe d64": ((2, 16, 577, 577, 64), AttnSpec(probe_rows=torch.tensor([0], device=dev))),
    "LLaVA prefill causal d128": ((1, 32, 700, 700, 128), AttnSpec(causal=True)),
    "padded + causal d64": ((2, 8, 100, 160, 64), AttnSpec(causal=True, k_lengths=torch.tensor([160, 90], device=dev))),
    "TCPA all_keys + subset d64": ((2, 12, 197, 233, 64), AttnSpec(
        q_groups=tcpa_q, k_groups=tcpa_k, subset_group=2, normalize="all_keys",
        row_subset=torch.randint(0, 2 ** 18, (2, 197), device=dev), probe_rows=torch.tensor([0], device=dev))),
    "DPL segmented, gate 0.9 d64": ((2, 12, 213, 213, 64), AttnSpec(
        q_groups=dpl, k_groups=dpl, allow=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool, device=dev),
        normalize="segmented", segment_gate=0.9)),
    "KTPP top-k 105 + epilogue d64": ((2, 6, 210, 210, 64), AttnSpec(
        topk=105, epilogue_add=torch.randn(2, 6, 64, device=dev))),
    "KTPP top-k 200 d128": ((1, 6, 300, 300, 128), AttnSpec(topk=200)),
}
bad = 0
for name, ((b, h, nq, nk, d), spec) in cases.items():
    route = dispatch.choose_route(spec, device_type="cuda", dtype=torch.bfloat16, head_dim=d, nq=nq, nk=nk,
                                  triton_ok=True, lengths_ok=dispatch._lengths_ok(spec))
    try:
        q, k, v = (torch.randn(b, h, n, d, device=dev) for n in (nq, nk, nk))
        if spec.epilogue_add is not None:
            spec = spec.replace(epilogue_add=spec.epilogue_add.to(torch.bfloat16))
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
        got = attention(*leaves, spec)
        ref_spec = spec if spec.epilogue_add is None else spec.replace(epilogue_add=spec.epilogue_add.float())
        ref = reference_attention(*ref_leaves, ref_spec)
        g = torch.randn_like(ref.out)
        grads = torch.autograd.grad((got.out.float() * g).sum(), leaves)
        ref_grads = torch.autograd.grad((ref.out * g).sum(), ref_leaves)
        err = (got.out.float() - ref.out).abs().max().item()
        rel = max(((a.float() - r).norm() / r.norm()).item() for a, r in zip(grads, ref_grads))
        ok = err < 5e-2 and rel < 5e-2
        if spec.probe_rows is not None:
            perr = (got.probes.float() - ref.probes.float()).abs().max().item()
            ok = ok and perr < 1e-2
        else:
            perr = float("nan")
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} [{route}]: max|out err| {err:.2e}, grad rel err {rel:.2e}, "
              f"probe err {perr:.1e}", flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on to the next case
        bad += 1
        print(f"FAIL {name} [{route}]: {type(e).__name__}: {str(e)[:500]}", flush=True)
raise SystemExit(1 if bad else 0)
EOF
sed 's/^/  - /' "$OUT/smoke.log" | grep -E "^  - (ok|FAIL)" >> "$SUMMARY"

: > "$OUT/attention.md"
CASES="${CASES:-$("$PY" benchmarks/attention.py --list 2>/dev/null | awk '{print $1}' | tr '\n' ' ')}"
for c in $CASES; do
    if (( $(left) < 15 )); then
        say "- benchmark $c: skipped (budget spent)"
        continue
    fi
    step "benchmark $c" "$(limit "${CASE_S:-60}")" "$OUT/bench_$c.log" \
        "$PY" benchmarks/attention.py --case "$c" --reps "${BENCH_REPS:-5}" --no-probes
    grep -E "^(device:|\| )" "$OUT/bench_$c.log" | grep -v "^| case\|^|---" >> "$OUT/attention.md"
done
if (( $(left) > 30 )); then
    step "benchmark probe-row overhead" "$(limit 60)" "$OUT/bench_probes.log" "$PY" - <<'EOF'
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("bench_attention", "benchmarks/attention.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)
for row in bench.probe_overhead(torch.device("cuda"), torch.bfloat16, 5):
    print(row)
EOF
    grep -E "^\| " "$OUT/bench_probes.log" >> "$OUT/attention.md"
fi

say ""
say "total $(( $(date +%s) - START ))s (budget ${BUDGET_S}s); results in $OUT"
{
    echo
    echo "## benchmarks/attention.py"
    echo
    echo "| case | implementation | pass | ms | TFLOP/s (unmasked) |"
    echo "|---|---|---|---|---|"
    grep -E "^\| " "$OUT/attention.md"
    grep -m1 "^device:" "$OUT/attention.md"
} >> "$SUMMARY"
exit 0
