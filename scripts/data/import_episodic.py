#!/usr/bin/env python
"""Convert the pickle releases of tieredImageNet, CIFAR-FS and FC100 into `{base,val,novel}/<class>/*.png`.

    python scripts/data/import_episodic.py --dataset cifar_fs --src ~/dl/CIFAR-FS --out ~/data/cifar_fs
    python scripts/data/import_episodic.py --dataset fc100 --src ~/dl/FC100 --out ~/data/fc100
    python scripts/data/import_episodic.py --dataset tiered_imagenet --src ~/dl/tiered-imagenet --out ~/data/tiered_imagenet

Inputs are described in `vlm.datamodules.episodic_pickles`. The .pkl/.pickle files are unpickled:
pass only trusted dataset files. Then check with
`python scripts/data/prepare.py check --dataset <name> --root <out>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.datamodules.episodic_pickles import import_cifar_pickles, import_tiered


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["cifar_fs", "fc100", "tiered_imagenet"])
    p.add_argument("--src", required=True, type=Path, help="folder holding the release's pickle / npz files")
    p.add_argument("--out", required=True, type=Path, help="dataset root to write base/, val/, novel/ into")
    a = p.parse_args(argv)
    src, out = a.src.expanduser(), a.out.expanduser()
    if a.dataset == "tiered_imagenet":
        counts = import_tiered(src, out)
    else:
        counts = import_cifar_pickles(src, out, a.dataset)
    print(f"{a.dataset}: {counts} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
