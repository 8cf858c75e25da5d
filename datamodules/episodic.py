"""Episodic N-way K-shot data (miniImageNet, tieredImageNet, CIFAR-FS, FC100, ... and MNIST digits).

An episode draws ``way`` classes of one class split, then ``shot + query`` distinct images of each;
the batch lists the support images class by class (``shot`` each), then the query images class by
class (``query`` each), and carries ``episode_label`` (the class's position in the episode,
0..way-1) and ``episode = [way, shot, query]``. ``label`` is the *global* class index into
``EpisodicDataModule.classnames`` (so a model can look up the class's text).

Layouts, kept generic over any labelled image list:

* ``source="imagefolder"``: ``<root>/<split_dir>/<class>/<image>``, one folder per class split
  (the SemanticPrompt/SAA layout: ``base`` = meta-train, ``val`` = meta-val, ``novel`` = meta-test),
  with optional ``<root>/classnames.txt`` lines ``<folder> <name>`` (miniImageNet WNIDs -> words);
  this is the layout of ``configs/data/{mini_imagenet,tiered_imagenet,cifar_fs,fc100}.yaml``.
* ``source="coop"``: a CoOp split file ``<root>/split_zhou_<dataset>.json``; classes are split by
  label, the first half (base) for meta-training on the "train" images, the second half (novel)
  for meta-validation on "val" and meta-testing on "test".
* :class:`MNISTEpisodicDataModule`: the offline digits in the ``coop`` layout: meta-train on
  zero..four, 5-way episodes on the unseen digits five..nine.

Test episodes are fixed by ``seed`` (NumPy ``RandomState``), so every run sees the same ones; the
training sampler is reseeded with ``seed + epoch`` each epoch (``set_epoch``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from vlm.datamodules.image_list import ImageListDataset
from vlm.datamodules.mnist import MNIST_TRAIN_TRANSFORMS, prepare_mnist
from vlm.datamodules.splits import Datum, label_to_classname, read_split
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD, build_test_transform, build_train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class EpisodeSampler(Sampler[list[int]]):
    """Batches of dataset indices, one N-way K-shot episode per batch (support, then query).

    Args:
        labels: the label of every dataset item.
        way: classes per episode (N).
        shot: support images per class (K).
        query: query images per class.
        episodes: episodes per pass (the length of the sampler).
        seed: base seed; pass ``p`` uses ``RandomState(seed + epoch)``.
    """

    def __init__(self, labels: Sequence[int], way: int, shot: int, query: int, episodes: int, seed: int = 0) -> None:
        self.by_class: dict[int, np.ndarray] = {}
        for i, y in enumerate(labels):
            self.by_class.setdefault(int(y), []).append(i)  # type: ignore[arg-type]
        self.by_class = {c: np.asarray(v) for c, v in sorted(self.by_class.items())}
        if min(way, shot, query, episodes) < 1:
            raise ValueError("way, shot, query and episodes must all be >= 1.")
        if len(self.by_class) < way:
            raise ValueError(f"A {way}-way episode needs {way} classes; the split has {len(self.by_class)}.")
        small = {c: len(v) for c, v in self.by_class.items() if len(v) < shot + query}
        if small:
            raise ValueError(f"Classes with fewer than shot + query = {shot + query} images: {dict(list(small.items())[:5])}.")
        self.way, self.shot, self.query, self.episodes, self.seed = way, shot, query, episodes, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.RandomState(self.seed + self.epoch)
        classes = np.asarray(list(self.by_class))
        for _ in range(self.episodes):
            chosen = rng.choice(classes, self.way, replace=False)
            picks = [rng.choice(self.by_class[int(c)], self.shot + self.query, replace=False) for c in chosen]
            support = [int(i) for p in picks for i in p[: self.shot]]
            query = [int(i) for p in picks for i in p[self.shot :]]
            yield support + query


class EpisodeCollate:
    """Collate one episode and add ``episode_label`` and ``episode = [way, shot, query]``."""

    def __init__(self, way: int, shot: int, query: int) -> None:
        self.way, self.shot, self.query = way, shot, query

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = default_collate(items)
        ways = torch.arange(self.way)
        batch["episode_label"] = torch.cat([ways.repeat_interleave(self.shot), ways.repeat_interleave(self.query)])
        batch["episode"] = torch.tensor([self.way, self.shot, self.query])
        return batch


def read_classnames(root: Path) -> dict[str, str]:
    """``<root>/classnames.txt`` lines ``<folder> <name ...>`` (e.g. WNID -> words), if present."""
    path = root / "classnames.txt"
    if not path.is_file():
        return {}
    pairs = (line.strip().split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {p[0]: p[1] if len(p) > 1 else p[0] for p in pairs}


def image_folder_items(
    folder: Path, first_label: int = 0, names: Optional[dict[str, str]] = None
) -> tuple[list[Datum], list[str]]:
    """Images of ``<folder>/<class>/<image>`` (sorted) labelled from ``first_label``; and the class names.

    A class's name is ``names[folder]`` if given (``classnames.txt``), else the folder name with
    underscores as spaces.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"Episodic split folder '{folder}' not found (expected <root>/<split>/<class>/<image>).")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    names = names or {}
    readable = [names.get(c, c).replace("_", " ") for c in classes]
    items = []
    for i, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(Datum(str(f), first_label + i, readable[i], f"{name}/{f.name}"))
    return items, readable


class EpisodicDataModule(L.LightningDataModule):
    """N-way K-shot episodes over class-disjoint train / val / test class splits.

    Args:
        root: dataset folder.
        source: ``imagefolder`` or ``coop`` (see the module docstring).
        dataset: CoOp split-file name part (``coop`` only).
        image_dir: image folder under ``root`` that CoOp relpaths start from (``coop`` only).
        split_dirs: train / val / test class-split folders (``imagefolder`` only).
        way: classes per episode.
        shot: support images per class.
        query: query images per class (15 in the papers).
        train_episodes: episodes per training epoch.
        val_episodes: validation episodes (600 in SAA).
        test_episodes: test episodes (2,000 in KTPP's protocol).
        seed: episode seed (fixed test episodes).
        image_size: crop size.
        mean: normalisation mean.
        std: normalisation std.
        train_transforms: Dassl transform names for meta-training images.
        crop_scale: RandomResizedCrop scale range.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        root: str,
        source: Literal["imagefolder", "coop"] = "imagefolder",
        dataset: str = "",
        image_dir: str = "images",
        split_dirs: Sequence[str] = ("base", "val", "novel"),
        way: int = 5,
        shot: int = 1,
        query: int = 15,
        train_episodes: int = 100,
        val_episodes: int = 600,
        test_episodes: int = 2000,
        seed: int = 0,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        train_transforms: Sequence[str] = ("random_resized_crop", "random_flip", "normalize"),
        crop_scale: Sequence[float] = (0.08, 1.0),
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.source, self.way, self.shot, self.query = source, way, shot, query
        self.episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.seed, self.image_size, self.mean, self.std = seed, image_size, tuple(mean), tuple(std)
        self.train_transforms, self.crop_scale, self.num_workers = list(train_transforms), tuple(crop_scale), num_workers
        self.items, self.classnames = self._read(dataset, image_dir, list(split_dirs))
        self.sets: dict[str, ImageListDataset] = {}
        self.samplers: dict[str, EpisodeSampler] = {}

    def _read(self, dataset: str, image_dir: str, split_dirs: list[str]) -> tuple[dict[str, list[Datum]], list[str]]:
        """Items of the train / val / test class splits with global labels, and all class names."""
        if self.source == "imagefolder":
            items, names = {}, []
            readable = read_classnames(self.root)
            for key, folder in zip(("train", "val", "test"), split_dirs):
                items[key], new = image_folder_items(self.root / folder, first_label=len(names), names=readable)
                names += new
            return items, names
        if self.source != "coop":
            raise ValueError(f"source must be 'imagefolder' or 'coop'; got {self.source!r}.")
        split = read_split(self.root / f"split_zhou_{dataset}.json", self.root / image_dir, required=("train", "val", "test"))
        names_by_label = label_to_classname(*split.values())
        labels = sorted(names_by_label)
        base = set(labels[: len(labels) // 2])
        items = {
            "train": [d for d in split["train"] if d.label in base],
            "val": [d for d in split["val"] if d.label not in base],
            "test": [d for d in split["test"] if d.label not in base],
        }
        return items, [names_by_label[i] for i in labels]

    @property
    def num_classes(self) -> int:
        """Classes over all splits (global labels index ``classnames``)."""
        return len(self.classnames)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.sets:
            return
        norm = "normalize" in self.train_transforms
        train_tf = build_train_transform(self.image_size, self.train_transforms, self.mean, self.std, crop_scale=self.crop_scale)
        test_tf = build_test_transform(self.image_size, self.mean, self.std, normalize=norm)
        for key, items in self.items.items():
            self.sets[key] = ImageListDataset(items, train_tf if key == "train" else test_tf, name=f"episodic/{key}")
            seed = self.seed + {"train": 0, "val": 1_000_003, "test": 2_000_003}[key]
            labels = [d.label for d in items]
            self.samplers[key] = EpisodeSampler(labels, self.way, self.shot, self.query, self.episodes[key], seed)

    def _loader(self, key: str) -> DataLoader:
        if key not in self.sets:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        return DataLoader(
            self.sets[key],
            batch_sampler=self.samplers[key],
            num_workers=self.num_workers,
            collate_fn=EpisodeCollate(self.way, self.shot, self.query),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Fresh episodes each epoch (the sampler is reseeded by ``seed + epoch``)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        self.samplers["train"].set_epoch(epoch)
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class MNISTEpisodicDataModule(EpisodicDataModule):
    """Offline episodes over the MNIST digits: meta-train on zero..four, test 5-way on five..nine.

    Args:
        root: data cache folder (``$VLM_DATA`` or ``~/.cache/vlm/data`` by default).
        Others: as :class:`EpisodicDataModule`, with digit-friendly defaults (28 px, no flip).
    """

    def __init__(
        self,
        root: Optional[str] = None,
        way: int = 5,
        shot: int = 1,
        query: int = 15,
        train_episodes: int = 50,
        val_episodes: int = 100,
        test_episodes: int = 2000,
        seed: int = 0,
        image_size: int = 28,
        train_transforms: Sequence[str] = MNIST_TRAIN_TRANSFORMS,
        crop_scale: Sequence[float] = (0.6, 1.0),
        num_workers: int = 0,
    ) -> None:
        data_dir = prepare_mnist(root if root is None else os.path.expanduser(root))
        super().__init__(
            root=str(data_dir), source="coop", dataset="MNIST", image_dir="images", way=way, shot=shot,
            query=query, train_episodes=train_episodes, val_episodes=val_episodes, test_episodes=test_episodes,
            seed=seed, image_size=image_size, train_transforms=train_transforms, crop_scale=crop_scale,
            num_workers=num_workers,
        )  # fmt: skip
        self.save_hyperparameters()
