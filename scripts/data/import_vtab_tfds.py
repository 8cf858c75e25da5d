#!/usr/bin/env python
"""Convert VTAB-1k tasks from TensorFlow Datasets into the folder layout `vtab_*` datasets read.

    pip install tensorflow tensorflow-datasets        # only this importer needs them
    python scripts/data/import_vtab_tfds.py --out ~/data/vtab-1k --data-dir ~/tensorflow_datasets [--tasks cifar dtd ...]

Splits as in google-research/task_adaptation: train800, val200, train800val200 (their union) and
the full test part; see `vlm.datamodules.vtab_tfds`. TFDS builds (downloads) a dataset the first
time unless --no-prepare is given; resisc45 and diabetic_retinopathy need TFDS's manual download.
Then: `python scripts/data/prepare.py check --dataset vtab_cifar --root ~/data/vtab-1k`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.datamodules.vtab_tfds import TASKS, export_task, load_tfds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the vtab root: tasks land in <out>/<task>/")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's own)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK")
    p.add_argument("--no-prepare", action="store_true", help="do not call builder.download_and_prepare()")
    a = p.parse_args(argv)
    try:
        tfds = load_tfds()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task in a.tasks:
        counts = export_task(tfds, task, a.out.expanduser(), a.data_dir, prepare=not a.no_prepare)
        print(f"vtab_{task}: {counts} -> {a.out / task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
