"""MNIST-Location: the quadrant task built from the offline quickstart digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.datamodules.mnist import load_mnist_5k
from vlm.datamodules.mnist_location import (
    LOCATION_CLASSNAMES,
    MNISTLocationDataModule,
    place_in_quadrant,
    prepare_mnist_location,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vlm_data")
    prepare_mnist_location(root)
    return root


def test_place_in_quadrant_by_hand() -> None:
    digit = np.zeros((4, 4), dtype=np.uint8)
    digit[:2, :2] = 200  # ink in the top-left 2x2 block only
    # BOX 4 -> 2: each output pixel is the mean of a 2x2 input block.
    expected = {0: (0, 0), 1: (0, 2), 2: (2, 0), 3: (2, 2)}
    for q, (r, c) in expected.items():
        out = place_in_quadrant(digit, q)
        assert out.shape == (4, 4) and out.dtype == np.uint8
        assert out[r, c] == 200 and out.sum() == 200  # one 2x2 block -> one pixel of the 2x2 quadrant
    with pytest.raises(ValueError, match="quadrant must be 0..3"):
        place_in_quadrant(digit, 4)


def test_split_is_balanced_and_keeps_the_digit_split(root: Path) -> None:
    loc = json.loads((root / "mnist5k_location" / "split_zhou_MNISTLocation.json").read_text())
    digits = json.loads((root / "mnist5k" / "split_zhou_MNIST.json").read_text())
    assert list(loc) == ["train", "val", "test"]
    for key, per_quadrant in (("train", 250), ("test", 250)):
        assert np.bincount([e[1] for e in loc[key]], minlength=4).tolist() == [per_quadrant] * 4
    assert sorted(np.bincount([e[1] for e in loc["val"]], minlength=4).tolist()) == [120, 120, 130, 130]
    for key in loc:  # the same digit rows, so train and test share no digit
        rows = sorted(Path(e[0]).stem for e in loc[key])
        assert rows == sorted(Path(e[0]).stem for e in digits[key])
    for key in loc:  # every digit class is spread over all four quadrants
        rows_of = {Path(e[0]).stem: e[1] for e in digits[key]}
        pairs = {(rows_of[Path(e[0]).stem], e[1]) for e in loc[key]}
        assert len(pairs) == 40
    assert all(e[2] == LOCATION_CLASSNAMES[e[1]] for items in loc.values() for e in items)


def test_every_image_has_its_ink_in_its_labelled_quadrant(root: Path) -> None:
    loc = json.loads((root / "mnist5k_location" / "split_zhou_MNISTLocation.json").read_text())
    images, _ = load_mnist_5k()
    for rel, label, _ in loc["test"][::7] + loc["train"][::11]:
        png = np.asarray(Image.open(root / "mnist5k_location" / "images" / rel)).astype(np.int64)
        r, c = divmod(label, 2)
        inside = png[14 * r : 14 * r + 14, 14 * c : 14 * c + 14]
        assert png.sum() == inside.sum() > 0  # no ink outside the labelled quadrant
        digit = images[int(Path(rel).stem)].astype(np.int64)
        assert abs(inside.sum() * 4 - digit.sum()) <= 4 * 14 * 14  # the same digit, shrunk (box mean)


def test_prepare_is_idempotent(root: Path) -> None:
    split_file = root / "mnist5k_location" / "split_zhou_MNISTLocation.json"
    before = split_file.stat().st_mtime_ns
    prepare_mnist_location(root)
    assert split_file.stat().st_mtime_ns == before


def test_datamodule(root: Path) -> None:
    dm = MNISTLocationDataModule(root=str(root), num_shots=10, loader={"batch_size": 8})
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 4 and dm.classnames == LOCATION_CLASSNAMES
    assert len(dm.train_set) == 40 and [len(t) for t in dm.test_sets] == [1000]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 28, 28) and int(batch["label"].max()) < 4


def test_spatial_augmentation_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match=r"random_flip.*change its label.*\[normalize\]"):
        MNISTLocationDataModule(root=str(root), transforms={"train": ["random_flip", "normalize"]})
