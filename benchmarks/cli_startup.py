"""Wall time of `vlm --help` and `vlm fit --help` (issue 24 item 7: < 1.5 s and < 3 s warm).

    python benchmarks/cli_startup.py [--repeats 5] [--tree DIR]

Each command runs in a fresh process (``python -m vlm.runtime.cli``, what the ``vlm`` script runs),
``--repeats`` times; the table gives the median and the range. Rows:

* ``cold``: the first run with an empty help cache (a fresh ``XDG_CACHE_HOME``), i.e. what a first
  ``vlm fit --help`` costs: Lightning's import;
* ``warm``: the runs after it (the help cache filled, the files in the OS page cache);
* ``uncached``: ``VLM_HELP_CACHE=0``, every run builds the LightningCLI parser (warm OS cache).

``--tree DIR`` runs the commands from another checkout (e.g. ``git archive HEAD | tar -x -C DIR``,
with ``vlm/{prompts,pruning,datamodules,kernels}`` symlinked to the top-level folders) to compare
with the code before a change; a tree without a help cache gives the same times in every row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (["--help"], ["fit", "--help"])


def run_once(args: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlm.runtime.cli", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def measure(args: list[str], repeats: int, cwd: Path) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache, "HF_HUB_OFFLINE": "1"}
        if cwd != Path.cwd():
            env["PYTHONPATH"] = str(cwd)
        cold = [run_once(args, env, cwd)]
        warm = [run_once(args, env, cwd) for _ in range(repeats)]
        uncached = [run_once(args, {**env, "VLM_HELP_CACHE": "0"}, cwd) for _ in range(repeats)]
    return {"cold": cold, "warm": warm, "uncached": uncached}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to run from")
    a = p.parse_args()
    print(f"vlm CLI start-up, {os.cpu_count()} CPUs, tree {a.tree}, {a.repeats} repeats (seconds, median [min-max])")
    print(f"{'command':<18} {'cold':>8} {'warm':>22} {'uncached':>22}")
    for args in COMMANDS:
        times = measure(args, a.repeats, a.tree.resolve())

        def cell(xs: list[float]) -> str:
            return f"{statistics.median(xs):6.2f} [{min(xs):.2f}-{max(xs):.2f}]"

        print(f"{'vlm ' + ' '.join(args):<18} {times['cold'][0]:8.2f} {cell(times['warm']):>22} {cell(times['uncached']):>22}")


if __name__ == "__main__":
    main()
