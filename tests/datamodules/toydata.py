"""Tiny CoOp-style datasets for tests: PNG images plus a split_zhou_<Name>.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Labels deliberately not in sorted first-appearance order, so grouping order matters.
CLASSNAMES = ["cat", "dog", "golden_retriever", "owl", "eel"]  # 5 classes: base = 0..2, new = 3..4
TRAIN_COUNTS = {3: 6, 0: 5, 4: 2, 1: 7, 2: 5}  # label 4 has fewer than K=4 images
VAL_COUNTS = {1: 3, 0: 5, 2: 4, 3: 6, 4: 1}
TEST_COUNTS = {0: 3, 1: 2, 2: 3, 3: 2, 4: 4}


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 14), mode: str = "RGB") -> None:
    """A small random image (width x height) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def make_dataset(root: Path, name: str = "Toy", image_dir: str = "images", write_images: bool = True) -> Path:
    """Write `<root>/split_zhou_<name>.json` and its images; return `root`."""
    split: dict[str, list[list[object]]] = {}
    n = 0
    for key, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS), ("test", TEST_COUNTS)):
        entries = []
        # interleave classes so first appearance != sorted order: round-robin over the dict order
        pending = {label: list(range(c)) for label, c in counts.items()}
        while any(pending.values()):
            for label, idx in pending.items():
                if idx:
                    i = idx.pop(0)
                    rel = f"{CLASSNAMES[label]}/{key}_{i}.png"
                    entries.append([rel, label, CLASSNAMES[label]])
                    if write_images:
                        write_image(root / image_dir / rel, seed=n)
                    n += 1
        split[key] = entries
    root.mkdir(parents=True, exist_ok=True)
    (root / f"split_zhou_{name}.json").write_text(json.dumps(split))
    return root
