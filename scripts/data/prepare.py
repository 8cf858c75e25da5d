#!/usr/bin/env python
"""Check a dataset root, write its missing derived files, and convert it to webdataset shards.

    # check the layout; download with torchvision and write a missing split where possible;
    # with --shots, also write the few-shot index file split_fewshot/shot_K-seed_S.json;
    # with --decode, also decode every listed image, so corrupt or truncated files are found before `vlm fit`
    python scripts/data/prepare.py check --dataset oxford_pets --root ~/data/oxford_pets [--download] [--shots 16 --seed 1] \\
        [--decode [--workers 8]]

    # convert one split (optionally its K-shot subset) to shards + manifest.json
    python scripts/data/prepare.py shards --dataset imagenet --root ~/data/imagenet --out ~/shards/imagenet \\
        --split train [--shots 16 --seed 1] [--shard-size 1000]

    python scripts/data/prepare.py list            # every registered dataset, its layout and download support

Shards land in `<out>/<split>[-<K>shot-seed<S>]/`; point `ShardDataModule.train_shards` there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlm.datamodules import available_datasets, get_dataset
from vlm.datamodules.downloads import download_support
from vlm.datamodules.fewshot import load_or_create_fewshot
from vlm.datamodules.shards import write_shards
from vlm.datamodules.splits import Datum, check_images_exist
from vlm.datamodules.transforms import decode_errors


def _cache_dir(root: Path, name: str) -> Path:
    family = get_dataset(name).family
    return root / "split_fewshot" if family in ("coop", "imagenet_ood") else root / "split_fewshot" / name


class CorruptImagesError(ValueError):
    """Images listed in a split that exist but do not decode (``check --decode``)."""


def decode_images(split: dict[str, list[Datum]], workers: int = 1, show: int = 10) -> int:
    """Decode every image of ``split`` (each file once) with ``workers`` processes, as the loaders do
    (vlm.datamodules.transforms.decode_errors); return how many were decoded, or raise
    :class:`CorruptImagesError` naming how many fail and the first ``show`` of them."""
    paths = sorted({d.impath for items in split.values() for d in items})
    bad = decode_errors(paths, workers)
    if bad:
        listed = "\n  ".join(e for _, e in bad[:show])
        raise CorruptImagesError(
            f"{len(bad)} of {len(paths)} images do not decode; first {min(show, len(bad))}:\n  {listed}\n"
            "Re-download or remove these files (and their split entries), or train with "
            "data.init_args.on_corrupt=skip, which skips and counts them in results.json."
        )
    return len(paths)


def check(
    dataset: str, root: Path, download: bool = False, shots: int = 0, seed: int = 1, decode: bool = False, workers: int = 1
) -> dict[str, int]:
    """Prepare what is missing, read the root, verify every image exists (and, with ``decode``,
    that it decodes); return counts per split."""
    spec = get_dataset(dataset)
    written = spec.prepare(root, spec, download) if spec.prepare is not None else []
    for path in written:
        print(f"wrote {path}")
    split = spec.read(root)
    check_images_exist(split, image_root=root)
    if decode:
        print(f"decoded {decode_images(split, workers)} images: all readable")
    if shots > 0:
        train, val = load_or_create_fewshot(split, shots, seed, _cache_dir(root, dataset))
        print(f"few-shot index: {_cache_dir(root, dataset) / f'shot_{shots}-seed_{seed}.json'} ({len(train)} train, {len(val)} val)")
    counts = {k: len(v) for k, v in split.items()}
    print(f"{dataset}: OK {counts}")
    return counts


def _all_classnames(split: dict[str, list[Datum]]) -> list[str]:
    items = [d for v in split.values() for d in v]
    names = {d.label: d.classname for d in items}
    return [names.get(y, f"class_{y}") for y in range(max(names) + 1)] if names else []


def shards(
    dataset: str, root: Path, out: Path, split_name: str, shots: int = 0, seed: int = 1, shard_size: int = 1000
) -> Path:
    """Write one split (its K-shot subset for train/val when `shots` > 0) as shards; return the folder."""
    spec = get_dataset(dataset)
    split = spec.read(root)
    if split_name not in split:
        raise SystemExit(f"{dataset} has splits {sorted(split)}; --split {split_name} is not one.")
    items = split[split_name]
    if shots > 0 and split_name in ("train", "val"):
        train, val = load_or_create_fewshot(split, shots, seed, _cache_dir(root, dataset))
        items = train if split_name == "train" else val
    check_images_exist({split_name: items}, image_root=root)
    folder = out / (f"{split_name}-{shots}shot-seed{seed}" if shots > 0 and split_name in ("train", "val") else split_name)
    manifest = write_shards(
        items, folder, prefix=split_name, classnames=_all_classnames(split), shard_size=shard_size,
        shuffle_seed=seed if split_name == "train" else None,
        meta={"dataset": dataset, "split": split_name, "num_shots": shots, "seed": seed, "source_root": str(root)},
    )  # fmt: skip
    print(f"wrote {len(manifest['shards'])} shards, {manifest['count']} samples to {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check a root, write missing split / few-shot index files")
    s = sub.add_parser("shards", help="convert a split to webdataset shards")
    sub.add_parser("list", help="list the registered datasets and their layouts")
    for q in (c, s):
        q.add_argument("--dataset", required=True, choices=available_datasets(), metavar="NAME")
        q.add_argument("--root", required=True, type=Path)
        q.add_argument("--shots", type=int, default=0, help="K-shot subset (0: the full split)")
        q.add_argument("--seed", type=int, default=1)
    c.add_argument("--download", action="store_true", help="fetch raw files with torchvision where it can")
    c.add_argument("--decode", action="store_true", help="decode every listed image, to find corrupt or truncated files")
    c.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for --decode (default: all cores)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--split", default="train")
    s.add_argument("--shard-size", type=int, default=1000)
    a = p.parse_args(argv)
    if a.cmd == "list":
        for name in available_datasets():
            spec = get_dataset(name)
            print(f"{name} [{spec.family}]\n{spec.layout}\n  download: {download_support(spec)}")
        return 0
    if a.cmd == "check":
        try:
            check(a.dataset, a.root.expanduser(), a.download, a.shots, a.seed, a.decode, a.workers)
        except CorruptImagesError as err:
            print(f"prepare.py check: {err}", file=sys.stderr)
            return 1
    else:
        shards(a.dataset, a.root.expanduser(), a.out.expanduser(), a.split, a.shots, a.seed, a.shard_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
