"""One command that compares pruners: methods x budgets (+ the unpruned baseline) on one model and
one eval set, each a ``vlm test`` run with its own ``results.json``, then ``report.md`` and
``report.png`` (``scripts/compare_pruners.py`` is the command line).

Every run is ``vlm test <configs> <overrides> --model.init_args.pruner.class_path <name>
--model.init_args.pruner.init_args.num_tokens <T> --trainer.default_root_dir <out>/<name>_<T>
--trainer.logger false`` (the baseline: ``--model.init_args.pruner null``, in ``<out>/none``), run in
this process through :func:`vlm.runtime.cli.main` (``subprocess=True``: one ``python -m
vlm.runtime.cli`` per run). A budget the backbone cannot give (``TokenBudgetError``) is a skipped row
with the error's message, not a crash.

``report.md``: one row per run: the eval set's metrics (``test/<name>``; per-group metrics such as
POPE's per-category ones are left out) with each value relative to the unpruned run (%), the visual
tokens entering the LLM (``test/visual_tokens``), the prefill time (``test/prefill_ms``) and the
speed-up, which is computed from the printed (rounded) milliseconds, so the columns agree.
``report.png``: accuracy and speed-up against the retained visual tokens, one line per method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

#: metrics that are not accuracies: reported in their own columns
TOKENS, PREFILL, DECODE = "test/visual_tokens", "test/prefill_ms", "test/decode_ms_per_token"
NOT_ACCURACY = (TOKENS, PREFILL, DECODE)
BASELINE = "none"
MS_DIGITS, SPEEDUP_DIGITS, METRIC_DIGITS, TOKEN_DIGITS, REL_DIGITS = 2, 2, 2, 1, 1


@dataclass
class Run:
    """One ``vlm test``: ``method`` (``none`` for the baseline), ``budget`` (None for the baseline),
    its folder, and after it ran: ``results`` (the results.json it wrote, and its path) or ``skipped``
    (why it did not run)."""

    method: str
    budget: Optional[int]
    folder: Path
    results: Optional[dict[str, Any]] = None
    results_path: Optional[Path] = None
    skipped: Optional[str] = None
    argv: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return BASELINE if self.method == BASELINE else f"{self.method}_{self.budget}"


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods, each a registered pruner name (``vlm.pruning.available()``); an unknown one is
    a ``ValueError`` that lists the available names."""
    import vlm.pruning as pruning

    available = pruning.available()
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(
            f"unknown pruner name(s) {', '.join(map(repr, unknown))}; available: {', '.join(available)} "
            "(vlm.pruning.available())."
        )
    if BASELINE in methods:
        raise ValueError(f"{BASELINE!r} is the unpruned baseline, run once on its own; leave it out of --methods.")
    return list(dict.fromkeys(methods))


def plan(methods: Sequence[str], budgets: Sequence[int], out: Path, baseline: bool = True) -> list[Run]:
    runs = [Run(BASELINE, None, out / BASELINE)] if baseline else []
    for m in check_methods(methods):
        for b in dict.fromkeys(int(x) for x in budgets):
            if b < 1:
                raise ValueError(f"budgets must be >= 1, got {b}.")
            runs.append(Run(m, b, out / f"{m}_{b}"))
    return runs


def run_argv(run: Run, configs: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """The ``vlm test`` command line (without ``vlm``) of one run."""
    argv = ["test"] + [a for c in configs for a in ("--config", str(c))] + list(overrides)
    if run.method == BASELINE:
        argv += ["--model.init_args.pruner", "null"]
    else:
        argv += ["--model.init_args.pruner.class_path", run.method,
                 "--model.init_args.pruner.init_args.num_tokens", str(run.budget)]
    return argv + ["--trainer.default_root_dir", str(run.folder), "--trainer.logger", "false"]


def _budget_error(err: BaseException) -> Optional[BaseException]:
    """``err`` or the error it was raised from, if it is a ``TokenBudgetError``."""
    from vlm.runtime.reliability import TokenBudgetError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TokenBudgetError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _results_files(folder: Path) -> set[Path]:
    return set(folder.glob("results*.json")) if folder.is_dir() else set()


def execute(run: Run, configs: Sequence[str], overrides: Sequence[str], in_subprocess: bool = False) -> Run:
    """Run ``vlm test`` for ``run`` and read back the ``results.json`` it wrote (a folder that
    already held one gets ``results.<n>.json``: the new file is read)."""
    run.folder.mkdir(parents=True, exist_ok=True)
    before = _results_files(run.folder)
    run.argv = run_argv(run, configs, overrides)
    if in_subprocess:
        proc = subprocess.run([sys.executable, "-m", "vlm.runtime.cli", *run.argv], capture_output=True, text=True)
        (run.folder / "vlm_test.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            if "TokenBudgetError" in proc.stderr:
                line = next(ln for ln in proc.stderr.splitlines() if "TokenBudgetError" in ln)
                run.skipped = line.split("TokenBudgetError:", 1)[-1].strip()
                return run
            raise RuntimeError(f"vlm {' '.join(run.argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    else:
        from vlm.runtime.cli import main

        try:
            main(run.argv)
        except Exception as err:  # noqa: BLE001 - only a budget error is a skipped row
            budget = _budget_error(err)
            if budget is None:
                raise
            run.skipped = str(budget)
            return run
        finally:
            _release_memory()
    new = sorted(_results_files(run.folder) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"vlm test for {run.name} wrote no results*.json into {run.folder}.")
    run.results_path = new[-1]
    run.results = json.loads(run.results_path.read_text())
    return run


def _release_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# --- the report ---------------------------------------------------------------------------------
def accuracy_metrics(runs: Sequence[Run]) -> list[str]:
    """The eval set's metrics, in the order the first finished run logged them: ``test/<name>``
    (one level: per-group metrics such as ``test/pope_acc/adversarial`` are left out)."""
    names: list[str] = []
    for r in runs:
        for k in (r.results or {}).get("metrics", {}):
            if k.startswith("test/") and k.count("/") == 1 and k not in NOT_ACCURACY and k not in names:
                names.append(k)
    return names


def _fmt(value: Optional[float], digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """The report's metric names and one row per run: printed strings and the numbers behind them.
    Relative values and the speed-up are computed from the printed (rounded) numbers."""
    metrics = accuracy_metrics(runs)
    base = next((r for r in runs if r.method == BASELINE and r.results is not None), None)
    base_m = base.results["metrics"] if base is not None else {}
    base_ms = round(base_m[PREFILL], MS_DIGITS) if PREFILL in base_m else None
    out = []
    for r in runs:
        row: dict[str, Any] = {"method": r.method, "budget": r.budget, "run": r.name, "skipped": r.skipped,
                               "results": str(r.results_path) if r.results_path else None, "metrics": {}}
        if r.results is not None:
            m = r.results["metrics"]
            for name in metrics:
                v = round(m[name], METRIC_DIGITS) if name in m else None
                b = round(base_m[name], METRIC_DIGITS) if name in base_m else None
                rel = round(100.0 * v / b, REL_DIGITS) if v is not None and b else None
                row["metrics"][name] = {"value": v, "relative": rel}
            row["visual_tokens"] = round(m[TOKENS], TOKEN_DIGITS) if TOKENS in m else None
            row["prefill_ms"] = ms = round(m[PREFILL], MS_DIGITS) if PREFILL in m else None
            row["speedup"] = round(base_ms / ms, SPEEDUP_DIGITS) if base_ms and ms else None
        out.append(row)
    return metrics, out


def markdown(runs: Sequence[Run], title: str = "") -> str:
    metrics, table = rows(runs)
    short = [m.split("/", 1)[1] for m in metrics]
    header = ["method", "budget", *[f"{s} (rel. %)" for s in short], "visual tokens", "prefill ms", "speed-up"]
    lines = [f"# {title}" if title else "# Pruner comparison", ""]
    first = next((r.results for r in runs if r.results is not None), None)
    if first is not None:
        bb = first.get("backbone") or {}
        lines += [f"- eval set: `{first.get('dataset')}`", f"- model: `{json.dumps(bb, sort_keys=True)}`"]
    lines += ["- relative: % of the unpruned run's value; speed-up: unpruned prefill ms / the row's prefill ms "
              "(vision + projector + LLM prefill per batch, as printed)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        budget = "—" if row["budget"] is None else str(row["budget"])
        if row["skipped"] is not None:
            reason = " ".join(str(row["skipped"]).split()).replace("|", "/")
            cells = [row["method"], budget, f"skipped: {reason}"] + [""] * (len(header) - 3)
        else:
            cells = [row["method"], budget]
            for name in metrics:
                v = row["metrics"][name]
                rel = "—" if v["relative"] is None else f"{v['relative']:.{REL_DIGITS}f}%"
                cells.append(f"{_fmt(v['value'], METRIC_DIGITS)} ({rel})")
            cells += [_fmt(row["visual_tokens"], TOKEN_DIGITS), _fmt(row["prefill_ms"], MS_DIGITS),
                      "—" if row["speedup"] is None else f"{row['speedup']:.{SPEEDUP_DIGITS}f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Runs (each folder holds its `results.json` and `config_test.yaml`):", ""]
    lines += [f"- `{r.name}`: `{r.results_path or r.folder}`" for r in runs]
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], path: Path, metric: Optional[str] = None) -> Path:
    """``report.png``: ``metric`` (default: the first accuracy metric) and the speed-up against the
    retained visual tokens, one line per method, the unpruned run as a dashed line and a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, table = rows(runs)
    metric = metric or (metrics[0] if metrics else None)
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    base = next((r for r in table if r["method"] == BASELINE and r["skipped"] is None), None)
    methods = list(dict.fromkeys(r["method"] for r in table if r["method"] != BASELINE))
    for method in methods:
        pts = sorted((r["visual_tokens"], r["metrics"].get(metric, {}).get("value"), r["speedup"])
                     for r in table if r["method"] == method and r["skipped"] is None and r["visual_tokens"] is not None)
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax_acc.plot(x, [p[1] if p[1] is not None else float("nan") for p in pts], marker="o", label=method)
        ax_speed.plot(x, [p[2] if p[2] is not None else float("nan") for p in pts], marker="o", label=method)
    if base is not None:
        bm = base["metrics"].get(metric, {}).get("value")
        if bm is not None:
            ax_acc.axhline(bm, color="gray", linestyle="--", label="unpruned")
            ax_acc.plot([base["visual_tokens"]], [bm], marker="*", color="gray", markersize=12)
        ax_speed.axhline(1.0, color="gray", linestyle="--", label="unpruned")
        ax_speed.plot([base["visual_tokens"]], [1.0], marker="*", color="gray", markersize=12)
    name = metric.split("/", 1)[1] if metric else "accuracy"
    ax_acc.set(xlabel="visual tokens entering the LLM", ylabel=name, title=f"{name} vs retained tokens")
    ax_speed.set(xlabel="visual tokens entering the LLM", ylabel="prefill speed-up vs unpruned (x)",
                 title="speed-up vs retained tokens")
    for ax in (ax_acc, ax_speed):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def compare(
    configs: Sequence[str],
    methods: Sequence[str],
    budgets: Sequence[int],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    baseline: bool = True,
    in_subprocess: bool = False,
    plot_metric: Optional[str] = None,
    log=print,
    warmup: bool = True,
) -> list[Run]:
    """Run every (method, budget) and the baseline, write ``report.md``, ``report.json`` and
    ``report.png`` into ``out``; return the runs. ``warmup`` (in-process runs): one unpruned run
    first, into ``out/warmup`` and left out of the report, so that one-time costs (kernel
    compilation, allocator growth, CUDA context) do not land on the first measured run."""
    out = Path(out)
    runs = plan(methods, budgets, out, baseline)
    out.mkdir(parents=True, exist_ok=True)
    if warmup and not in_subprocess:
        log("[compare] warm-up run (not reported)")
        execute(Run(BASELINE, None, out / "warmup"), configs, overrides, in_subprocess)
    for i, run in enumerate(runs):
        log(f"[compare] {i + 1}/{len(runs)}: {run.name}")
        execute(run, configs, overrides, in_subprocess)
        if run.skipped:
            log(f"[compare] {run.name} skipped: {run.skipped}")
    (out / "report.md").write_text(markdown(runs))
    metrics, table = rows(runs)
    (out / "report.json").write_text(json.dumps({"metrics": metrics, "rows": table}, indent=1))
    plot(runs, out / "report.png", plot_metric)
    log(f"[compare] wrote {out / 'report.md'} and {out / 'report.png'}")
    return runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_pruners.py",
        description="Sweep pruners x budgets (+ the unpruned baseline) with `vlm test` on one model and eval "
                    "set; write report.md and report.png. Arguments not listed here (e.g. "
                    "--data.init_args.limit 100) are passed to every `vlm test`.",
    )
    p.add_argument("--config", action="append", required=True,
                   help="a `vlm test` config (model, data, ...); repeat to compose, left to right")
    p.add_argument("--methods", nargs="+", required=True, help="pruner names (vlm.pruning.available())")
    p.add_argument("--budgets", nargs="+", type=int, required=True, help="num_tokens of each pruner")
    p.add_argument("--out", required=True, help="folder: one sub-folder per run, report.md, report.png")
    p.add_argument("--no_baseline", action="store_true", help="do not run the unpruned baseline")
    p.add_argument("--subprocess", action="store_true", help="one `python -m vlm.runtime.cli` process per run")
    p.add_argument("--no_warmup", action="store_true", help="skip the unreported unpruned run made first in-process")
    p.add_argument("--plot_metric", default=None, help="metric of the accuracy panel (default: the first one)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parser().parse_known_args(argv)
    try:
        check_methods(args.methods)
    except ValueError as err:
        parser().error(str(err))
    compare(args.config, args.methods, args.budgets, args.out, overrides, not args.no_baseline, args.subprocess,
            args.plot_metric, warmup=not args.no_warmup)
    return 0
