#!/usr/bin/env python
"""Images/s of the training input pipeline: image folder (ImageListDataset) vs webdataset shards.

    python benchmarks/dataloading.py [--images 512] [--size 256] [--workers 0 2] [--batch 32]

Generates a synthetic EuroSAT-layout folder of JPEGs (random pixels, `--size` px), converts it to
shards with the writer prepare.py uses, then times full passes of the CLIP train transform (RRC 224 +
flip + normalize) through both loaders after one warm-up pass. Not a test: numbers depend on the
machine (disk cache, cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from vlm.datamodules import ShardDataModule, get_dataset
from vlm.datamodules.image_list import ImageListDataset
from vlm.datamodules.shards import write_shards
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD, DEFAULT_TRAIN_TRANSFORMS, build_train_transform


def make_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / "2750" / f"class{i % classes}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def timed(loader, passes: int = 2) -> float:
    for _ in loader:  # warm-up (page cache, workers)
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(passes):
        for batch in loader:
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--shard-size", type=int, default=64)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, a.images, a.size)
        spec = get_dataset("eurosat")
        spec.prepare(root, spec, False)
        items = spec.read(root)["train"] + spec.read(root)["val"] + spec.read(root)["test"]
        folder = write_shards(items, root / "shards", prefix="train", classnames=[f"class{i}" for i in range(10)],
                                      shard_size=a.shard_size, shuffle_seed=1)  # fmt: skip
        tf = build_train_transform(224, DEFAULT_TRAIN_TRANSFORMS, CLIP_MEAN, CLIP_STD)
        print(f"{len(items)} JPEGs of {a.size}x{a.size}, batch {a.batch}, {len(folder['shards'])} shards; train transform RRC224+flip+norm")
        for w in a.workers:
            ds = ImageListDataset(items, tf)
            folder_ips = timed(DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=w, persistent_workers=w > 0))
            dm = ShardDataModule(str(root / "shards"), subsample="all", batch_size=a.batch, num_workers=w, shuffle_buffer=256)
            shard_ips = timed(dm.train_dataloader())
            print(f"workers={w}: image folder {folder_ips:7.1f} img/s | shards (resampled) {shard_ips:7.1f} img/s")


if __name__ == "__main__":
    main()
