#!/usr/bin/env python
"""Aggregate `results.json` files the way the papers report them.

    python scripts/reproduce/aggregate.py runs/sweep [--metric test/acc_all]

Per (method, dataset): mean ± 95 % CI over seeds of base, new and HM, with the CoOp family's
convention (Dassl's parse_test_res.py): 1.96 · sample std / sqrt(n).
The "Average" row averages base and new over datasets and takes HM of those averages (the
papers' convention, which reproduces their headline numbers), not the mean of per-dataset HMs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlm.metrics import harmonic_mean, mean_ci95


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """Every results.json under the given files/folders."""
    found = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("results.json")))]
    if not found:
        raise SystemExit(f"No results.json under {[str(p) for p in paths]}.")
    return [json.loads(p.read_text()) for p in found]


def aggregate(results: list[dict[str, Any]], metric: str | None = None) -> dict[str, Any]:
    """{method: {"datasets": {dataset: {column: (mean, ci, n)}}, "average": {...}}}."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        m = r["metrics"]
        key = (str(r.get("method")), str(r.get("dataset")))
        if metric is not None:
            if metric in m:
                cells[key][metric].append(m[metric])
            continue
        for col, name in (("base", "test/acc_base"), ("new", "test/acc_new")):
            if name in m:
                cells[key][col].append(m[name])
        if "test/acc_base" in m and "test/acc_new" in m:
            cells[key]["hm"].append(harmonic_mean(m["test/acc_base"], m["test/acc_new"]))
    table: dict[str, Any] = defaultdict(lambda: {"datasets": {}, "average": {}})
    for (method, dataset), cols in sorted(cells.items()):
        table[method]["datasets"][dataset] = {c: (*mean_ci95(v), len(v)) for c, v in cols.items()}
    for method, t in table.items():
        for col in ("base", "new", metric) if metric else ("base", "new"):
            means = [d[col][0] for d in t["datasets"].values() if col in d]
            if means:
                t["average"][col] = statistics.fmean(means)
        if "base" in t["average"] and "new" in t["average"]:
            t["average"]["hm"] = harmonic_mean(t["average"]["base"], t["average"]["new"])
    return dict(table)


def render(table: dict[str, Any]) -> str:
    lines = []
    for method, t in table.items():
        cols = sorted({c for d in t["datasets"].values() for c in d}, key=lambda c: ("base", "new", "hm").index(c) if c in ("base", "new", "hm") else 9)
        lines.append(f"== {method}")
        lines.append(f"{'dataset':<18}" + "".join(f"{c:>22}" for c in cols))
        for ds, d in t["datasets"].items():
            lines.append(f"{ds:<18}" + "".join(f"{f'{d[c][0]:.2f} ± {d[c][1]:.2f} (n={d[c][2]})':>22}" if c in d else f"{'-':>22}" for c in cols))
        lines.append(f"{'Average':<18}" + "".join(f"{t['average'][c]:>22.2f}" if c in t["average"] else f"{'-':>22}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="results.json files or folders searched recursively")
    p.add_argument("--metric", default=None, help="aggregate one metric (e.g. test/acc_all) instead of base/new/HM")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    a = p.parse_args(argv)
    table = aggregate(load(a.paths), a.metric)
    print(json.dumps(table, indent=1) if a.json else render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
