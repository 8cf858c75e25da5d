"""MNIST-Location: a VTAB-structured-style task on the offline quickstart digits.

Each image is one quickstart digit shrunk to 14 px and placed in one quadrant of the 28 px canvas;
the label is the quadrant (top left, top right, bottom left, bottom right), not the digit. Like
VTAB-1k's dSprites-location and SmallNORB tasks, it asks a frozen tower that was pretrained for
*what* is in the image to say *where* it is. The quickstart tower's CLS was trained to name digits,
so the answer is only weakly linear in its pooled feature: the case where prompts, which change
what CLS attends to in every layer, beat a linear probe (the structured-task gains reported for visual prompts).

The images reuse the digit split's train/val/test rows (`prepare_mnist`), so no digit is shared
across train and test; within each digit and split, the quadrants are balanced (25 of the 100 train
and of the 100 test images each, 12 or 13 of the 50 val images) by a fixed permutation
(`RandomState(1)`). The dataset is a CoOp-style folder, so `FewShotDataModule` runs on
it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.datamodules.fewshot_datamodule import FewShotDataModule
from vlm.datamodules.image_list import OnCorrupt
from vlm.datamodules.mnist import (
    SPLIT_SIZES,
    _write_png,
    default_data_root,
    load_mnist_5k,
    prepare_mnist,
    split_ok,
    write_split_atomic,
)
from vlm.datamodules.splits import read_split
from vlm.datamodules.settings import check_settings, ImageTransforms, Loaders, SETTINGS, settings_hparams

LOCATION_CLASSNAMES: list[str] = ["top left", "top right", "bottom left", "bottom right"]
LOCATION_DIR = "mnist5k_location"
LOCATION_DATASET = "MNISTLocation"
# Spatial augmentation would move the digit across a quadrant border or mirror left and right,
# changing the label: only photometric normalisation is allowed.
LOCATION_TRANSFORMS: tuple[str, ...] = ("normalize",)
LOCATION_IMAGES = ImageTransforms(image_size=28, train=LOCATION_TRANSFORMS)
LOCATION_SPLITS: dict[str, int] = {k: SPLIT_SIZES[k] for k in ("train", "val", "test")}  # digits per class


def place_in_quadrant(digit: np.ndarray, quadrant: int) -> np.ndarray:
    """A 28x28 uint8 canvas with `digit` (28x28 uint8) shrunk to 14x14 (box filter) in `quadrant`
    (0 top left, 1 top right, 2 bottom left, 3 bottom right)."""
    if not 0 <= quadrant < 4:
        raise ValueError(f"quadrant must be 0..3, got {quadrant}.")
    h, w = digit.shape
    small = np.asarray(Image.fromarray(digit).resize((w // 2, h // 2), Image.BOX))
    canvas = np.zeros_like(digit)
    r, c = divmod(quadrant, 2)
    canvas[r * (h // 2) : (r + 1) * (h // 2), c * (w // 2) : (c + 1) * (w // 2)] = small
    return canvas


def _quadrant_counts(per_digit: int) -> list[int]:
    """Images per quadrant in a split with `per_digit` images of each of the 10 digits: each digit
    spreads `arange(per_digit) % 4` over the quadrants, so the first `per_digit % 4` get one more."""
    return [10 * (per_digit // 4 + (q < per_digit % 4)) for q in range(4)]


def prepare_mnist_location(root: str | os.PathLike[str] | None = None) -> Path:
    """Materialise MNIST-Location under `<root>/mnist5k_location` (idempotent); return that folder.

    Row r of digit split `key` becomes `<quadrant>/<r>.png` in the same split, so the location
    task's train and test images come from disjoint digits, as the digit task's do.
    """
    base = Path(root).expanduser() if root is not None else default_data_root()
    digits = read_split(prepare_mnist(base) / "split_zhou_MNIST.json", base / "mnist5k" / "images", required=tuple(LOCATION_SPLITS))
    data_dir = base / LOCATION_DIR
    image_root = data_dir / "images"
    split_file = data_dir / f"split_zhou_{LOCATION_DATASET}.json"
    if split_ok(split_file, image_root, {k: _quadrant_counts(n) for k, n in LOCATION_SPLITS.items()}):
        return data_dir
    images, _ = load_mnist_5k()
    rs = np.random.RandomState(1)
    split: dict[str, list[list[object]]] = {k: [] for k in LOCATION_SPLITS}
    for key in LOCATION_SPLITS:
        for label in range(10):
            rows = sorted(int(Path(d.impath).stem) for d in digits[key] if d.label == label)
            quadrants = rs.permutation(np.arange(len(rows)) % 4)
            for row, q in zip(rows, quadrants):
                name = LOCATION_CLASSNAMES[int(q)]
                folder = image_root / name.replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / f"{row:04d}.png").is_file():
                    _write_png(place_in_quadrant(images[row], int(q)), folder / f"{row:04d}.png")
                split[key].append([f"{folder.name}/{row:04d}.png", int(q), name])
    write_split_atomic(split, split_file)
    return data_dir


class MNISTLocationDataModule(FewShotDataModule):
    """K images per quadrant of MNIST-Location, tested on its held-out split (250 per quadrant).

    Args:
        root: data cache folder (the dataset lands in `<root>/mnist5k_location`, next to the digits).
        num_shots: images per quadrant for training (250 = the whole train split, VTAB-1k-sized).
        transforms: 28 px; ``train`` may only be ``[normalize]`` (a crop or flip would change the quadrant).
        Other arguments: as `FewShotDataModule`; every class is in "all" (base/new is meaningless here).
    """

    def __init__(
        self,
        root: str | None = None,
        num_shots: int = 250,
        seed: int = 1,
        transforms: ImageTransforms = LOCATION_IMAGES,
        loader: Loaders = Loaders(),
        strict_shots: bool = True,
        on_corrupt: OnCorrupt = "fail",
        fewshot_cache_dir: str | None = None,
    ) -> None:
        transforms, loader = check_settings(transforms, loader)
        spatial = [t for t in transforms.train if t != "normalize"]
        if spatial:
            raise ValueError(
                f"MNIST-Location labels are positions: transforms.train {spatial} would move or mirror the "
                "digit and change its label. Use transforms: {train: [normalize]}."
            )
        self.data_root = Path(root).expanduser() if root is not None else default_data_root()
        data_dir = prepare_mnist_location(self.data_root)
        super().__init__(
            root=str(data_dir), dataset=LOCATION_DATASET, image_dir="images", num_shots=num_shots, seed=seed,
            subsample="all", test_subsets=("all",), transforms=transforms, loader=loader, template="a digit in the {} corner.", strict_shots=strict_shots,
            on_corrupt=on_corrupt, fewshot_cache_dir=fewshot_cache_dir,
        )  # fmt: skip
        self.save_hyperparameters(ignore=SETTINGS)
        self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))

    def prepare_data(self) -> None:
        """Materialise the images (no-op when present), then the parent's checks and few-shot cache."""
        prepare_mnist_location(self.data_root)
        super().prepare_data()
