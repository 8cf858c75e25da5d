"""Offline stand-ins for torchvision's archive downloads: tiny files where the real archive would unpack.

`patch_downloads(monkeypatch, module)` replaces `download_and_extract_archive` / `download_url`
inside one torchvision dataset module with a function that writes the content of the named
archive (by URL basename) into the folder torchvision asked for, and records the basename. The
real torchvision class then runs unchanged: its own path logic decides where things land.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.data.layouts import img

Writer = Callable[[Path], None]


def _dtd(root: Path) -> None:
    base = root / "dtd"
    classes = ["banded", "zigzagged"]
    for key, per in (("train", 3), ("val", 2), ("test", 2)):
        rels = [f"{c}/{c}_{key}{i}.jpg" for c in classes for i in range(per)]
        for rel in rels:
            img(base / "images" / rel)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{key}1.txt").write_text("\n".join(rels) + "\n")


def _food101(root: Path) -> None:
    base = root / "food-101"
    meta: dict[str, dict[str, list[str]]] = {}
    for key, per in (("train", 5), ("test", 2)):
        meta[key] = {c: [f"{c}/{key}{i}" for i in range(per)] for c in ("apple_pie", "sushi")}
        for rels in meta[key].values():
            for rel in rels:
                img(base / "images" / f"{rel}.jpg")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for key, value in meta.items():
        (base / "meta" / f"{key}.json").write_text(json.dumps(value))


def _gtsrb_train(root: Path) -> None:
    for c in range(2):
        for i in range(5):
            img(root / "GTSRB" / "Training" / f"{c:05d}" / f"{i:05d}_00000.ppm")


def _gtsrb_test_images(root: Path) -> None:
    for n in range(4):
        img(root / "GTSRB" / "Final_Test" / "Images" / f"{n:05d}.ppm")


def _gtsrb_test_gt(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "GT-final_test.csv").open("w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "ClassId"])
        w.writerows([f"{n:05d}.ppm", 8, 8, n % 2] for n in range(4))


def _svhn(filename: str, n: int) -> Writer:
    def write(root: Path) -> None:
        from scipy.io import savemat

        rng = np.random.default_rng(n)
        labels = (np.arange(n) % 3 + 9).reshape(-1, 1)  # 9, 10 (the digit 0), 11 -> 1 below
        labels[labels == 11] = 1
        root.mkdir(parents=True, exist_ok=True)
        savemat(str(root / filename), {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels})

    return write


ARCHIVES: dict[str, Writer] = {
    "dtd-r1.0.1.tar.gz": _dtd,
    "food-101.tar.gz": _food101,
    "GTSRB-Training_fixed.zip": _gtsrb_train,
    "GTSRB_Final_Test_Images.zip": _gtsrb_test_images,
    "GTSRB_Final_Test_GT.zip": _gtsrb_test_gt,
    "train_32x32.mat": _svhn("train_32x32.mat", 10),
    "test_32x32.mat": _svhn("test_32x32.mat", 3),
}


def patch_downloads(monkeypatch: pytest.MonkeyPatch, module: object) -> list[str]:
    """Make `module`'s download helpers write `ARCHIVES[basename]` offline; return the list of fetched basenames."""
    fetched: list[str] = []

    def extract(url: str, download_root: str, extract_root: str | None = None, *args: object, **kwargs: object) -> None:
        name = url.rsplit("/", 1)[-1]
        fetched.append(name)
        ARCHIVES[name](Path(extract_root or download_root))

    def download_url(url: str, root: str, filename: str | None = None, *args: object, **kwargs: object) -> None:
        name = filename or url.rsplit("/", 1)[-1]
        if (Path(root) / name).is_file():  # as torchvision's download_url: an intact file is not fetched again
            return
        fetched.append(name)
        ARCHIVES[name](Path(root))

    for attr, fake in (("download_and_extract_archive", extract), ("download_url", download_url)):
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, fake)
    return fetched
