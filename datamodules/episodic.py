"""Episodic N-way K-shot data (miniImageNet, tieredImageNet, CIFAR-FS, FC100, ... and MNIST digits).

The one implementation of the episodic protocol in vlm: episode sampling (:class:`EpisodeSampler`,
also behind :func:`sample_episodes` and the stored index files of :func:`load_or_create_episodes`),
the 95 % interval (:func:`vlm.metrics.mean_ci95`) and the datamodules.

An episode draws ``way`` classes of one class split, then ``shot + query`` distinct images of each;
the batch lists the support images class by class (``shot`` each), then the query images class by
class (``query`` each), and carries ``episode_label`` (the class's position in the episode,
0..way-1) and ``episode = [way, shot, query]``. ``label`` is the *global* class index into
``EpisodicDataModule.classnames`` (so a model can look up the class's text).

Layouts, kept generic over any labelled image list:

* ``source="imagefolder"``: read by the dataset registry's episodic reader
  (:mod:`vlm.datamodules.readers_episodic`): ``<root>/{base,val,novel}/<class>/<image>`` (the
  SemanticPrompt/SAA layout: ``base`` = meta-train, ``val`` = meta-val, ``novel`` = meta-test),
  with optional ``<root>/classnames.txt`` lines ``<folder> <name>`` (miniImageNet WNIDs -> words),
  or miniImageNet's csv release. ``dataset`` names the registered dataset (``mini_imagenet``,
  ``tiered_imagenet``, ``cifar_fs``, ``fc100``; its template is the default ``template``); any
  other name reads the same layout. This is ``configs/data/{mini_imagenet,...}.yaml``.
* ``source="coop"``: a CoOp split file ``<root>/split_zhou_<dataset>.json``; classes are split by
  label, the first half (base) for meta-training on the "train" images, the second half (novel)
  for meta-validation on "val" and meta-testing on "test".
* :class:`MNISTEpisodicDataModule`: the offline digits in the ``coop`` layout: meta-train on
  zero..four, 5-way episodes on the unseen digits five..nine.

Validation and test episodes are fixed by ``seed`` (NumPy ``RandomState``), so every run sees the
same ones; with ``episodes_dir`` they are also written once as index files (relpaths) and replayed
from there. The training sampler is reseeded with ``seed + epoch`` each epoch (``set_epoch``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from vlm.datamodules.dataset_specs import DatasetSpec, available_datasets, get_dataset
from vlm.datamodules.image_list import ImageListDataset
from vlm.datamodules.mnist import MNIST_TRANSFORMS, prepare_mnist
from vlm.datamodules.readers_episodic import read_episodic
from vlm.datamodules.resumable import PassLoader, ResumableLoader, SeededDataset, SeededIndex, sample_seed
from vlm.datamodules.splits import Datum, label_to_classname, read_split
from vlm.datamodules.templates import DEFAULT_TEMPLATE
from vlm.datamodules.settings import check_settings, ImageTransforms, SETTINGS, settings_hparams, test_transform, train_transform


@dataclass(frozen=True)
class Episode:
    """Support and query items of one episode (indices into the split list), class by class;
    episode labels are 0..way-1 in ``classes`` order."""

    classes: tuple[int, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]


class EpisodeSampler(Sampler[list[int]]):
    """Batches of dataset indices, one N-way K-shot episode per batch (support, then query).

    Args:
        labels: the label of every dataset item.
        way: classes per episode (N).
        shot: support images per class (K).
        query: query images per class.
        episodes: episodes per pass (the length of the sampler).
        seed: base seed; pass ``p`` uses ``RandomState(seed + epoch)``.
        fixed: replay these episodes (e.g. from an index file) instead of drawing them.
    """

    def __init__(
        self, labels: Sequence[int], way: int, shot: int, query: int, episodes: int, seed: int = 0,
        fixed: Optional[Sequence[Episode]] = None,
    ) -> None:  # fmt: skip
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        self.by_class = {c: np.asarray(v) for c, v in sorted(by_class.items())}
        if min(way, shot, query, episodes) < 1:
            raise ValueError("way, shot, query and episodes must all be >= 1.")
        if len(self.by_class) < way:
            raise ValueError(f"A {way}-way episode needs {way} classes; the split has {len(self.by_class)}.")
        small = {c: len(v) for c, v in self.by_class.items() if len(v) < shot + query}
        if small:
            raise ValueError(f"Classes with fewer than shot + query = {shot + query} images: {dict(list(small.items())[:5])}.")
        if fixed is not None and (len(fixed) != episodes or any(len(e.support) != way * shot or len(e.query) != way * query for e in fixed)):
            raise ValueError(f"The fixed episodes are not {episodes} episodes of {way}-way {shot}-shot {query}-query.")
        self.way, self.shot, self.query, self.episodes, self.seed = way, shot, query, episodes, seed
        self.fixed = list(fixed) if fixed is not None else None
        self.epoch = 0
        self.num_replicas = 1
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.episodes

    @property
    def num_samples(self) -> int:
        """Episodes per pass (the unit :class:`~vlm.datamodules.resumable.ResumableLoader` counts)."""
        return self.episodes

    @property
    def epoch_seed(self) -> int:
        return self.seed + self.epoch

    def resume(self, epoch_seed: int, skip: int) -> None:
        """Replay this epoch's episodes from episode ``skip`` on the next pass."""
        if epoch_seed != self.epoch_seed:
            raise ValueError(f"episode seed {epoch_seed} is not this sampler's {self.epoch_seed} (seed + epoch).")
        self._skip = int(skip)

    def draw(self) -> list[Episode]:
        """This pass's episodes: the fixed ones, or ``episodes`` draws from ``RandomState(seed + epoch)``."""
        if self.fixed is not None:
            return list(self.fixed)
        rng = np.random.RandomState(self.seed + self.epoch)
        classes = np.asarray(list(self.by_class))
        out = []
        for _ in range(self.episodes):
            chosen = rng.choice(classes, self.way, replace=False)
            picks = [rng.choice(self.by_class[int(c)], self.shot + self.query, replace=False) for c in chosen]
            support = tuple(int(i) for p in picks for i in p[: self.shot])
            query = tuple(int(i) for p in picks for i in p[self.shot :])
            out.append(Episode(tuple(int(c) for c in chosen), support, query))
        return out

    def __iter__(self) -> Iterator[list[SeededIndex]]:
        """Support then query indices, each with its own augmentation seed (episode, slot)."""
        skip, self._skip = self._skip, 0
        for n, e in enumerate(self.draw()[skip:], start=skip):
            yield [SeededIndex(i, sample_seed(self.epoch_seed, n, j)) for j, i in enumerate(e.support + e.query)]


def sample_episodes(items: Sequence[Datum], n_way: int, n_shot: int, n_query: int, episodes: int, seed: int) -> list[Episode]:
    """``episodes`` episodes over ``items`` (:class:`EpisodeSampler`'s draws at epoch 0); raises if a class is too small."""
    return EpisodeSampler([d.label for d in items], n_way, n_shot, n_query, episodes, seed).draw()


def episode_file(cache_dir: str | Path, split: str, n_way: int, n_shot: int, n_query: int, episodes: int, seed: int) -> Path:
    """``<cache>/episodes/<split>_<way>w<shot>s<query>q_<n>-seed_<s>.json``."""
    return Path(cache_dir) / "episodes" / f"{split}_{n_way}w{n_shot}s{n_query}q_{episodes}-seed_{seed}.json"


def load_or_create_episodes(
    items: Sequence[Datum], split: str, cache_dir: str | Path, n_way: int = 5, n_shot: int = 1,
    n_query: int = 15, episodes: int = 1000, seed: int = 0,
) -> list[Episode]:  # fmt: skip
    """Episodes from the index file if it exists (checked against ``items``), else sampled and written.

    The file stores relpaths, so it survives a moved dataset root; an image it names that is not in
    ``items`` is an error (delete the file to resample).
    """
    path = episode_file(cache_dir, split, n_way, n_shot, n_query, episodes, seed)
    rel = [d.relpath or d.impath for d in items]
    if path.is_file():
        raw = json.loads(path.read_text())
        pos = {r: i for i, r in enumerate(rel)}
        try:
            return [
                Episode(tuple(e["classes"]), tuple(pos[r] for r in e["support"]), tuple(pos[r] for r in e["query"]))
                for e in raw["episodes"]
            ]
        except KeyError as e:
            raise ValueError(f"Episode file '{path}' names image {e} that is not in the split; delete it to resample.") from e
    eps = sample_episodes(items, n_way, n_shot, n_query, episodes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = [{"classes": list(e.classes), "support": [rel[i] for i in e.support], "query": [rel[i] for i in e.query]} for e in eps]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": "vlm-episodes-v1", "seed": seed, "episodes": payload}))
    os.replace(tmp, path)
    return eps


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


def _episodic_spec(dataset: str) -> DatasetSpec:
    """The registered episodic dataset ``dataset``, or the generic base/val/novel reader."""
    if dataset in available_datasets("episodic"):
        return get_dataset(dataset)
    layout = "  <root>/base/<class>/*, <root>/val/<class>/*, <root>/novel/<class>/*\n  optional <root>/classnames.txt"
    return DatasetSpec(name=dataset or "imagefolder", family="episodic", reader=read_episodic, layout=layout)


class EpisodicDataModule(L.LightningDataModule):
    """N-way K-shot episodes over class-disjoint train / val / test class splits.

    Args:
        root: dataset folder.
        dataset: registered episodic dataset (``imagefolder``: ``mini_imagenet`` ...) or the CoOp
            split-file name part (``coop``: ``MNIST`` for ``split_zhou_MNIST.json``).
        source: ``imagefolder`` or ``coop`` (see the module docstring).
        image_dir: image folder under ``root`` that CoOp relpaths start from (``coop`` only).
        way: classes per episode.
        shot: support images per class.
        query: query images per class (15 in the papers).
        train_episodes: episodes per training epoch.
        val_episodes: validation episodes (600 in SAA).
        test_episodes: test episodes (2,000 in the released episodic protocol).
        seed: episode seed (fixed val/test episodes).
        episodes_dir: if set, val/test episodes are stored there as index files on first use and
            replayed from them afterwards (:func:`load_or_create_episodes`).
        transforms: image size, normalisation and the meta-training augmentations
            (:class:`~vlm.datamodules.settings.ImageTransforms`; episodes fix the batch, so there is
            no ``loader`` setting besides ``num_workers``).
        num_workers: DataLoader workers.
        template: class-name prompt for text towers (default: the registered dataset's template);
            a model without its own template uses this one.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "",
        source: Literal["imagefolder", "coop"] = "imagefolder",
        image_dir: str = "images",
        way: int = 5,
        shot: int = 1,
        query: int = 15,
        train_episodes: int = 100,
        val_episodes: int = 600,
        test_episodes: int = 2000,
        seed: int = 0,
        episodes_dir: Optional[str] = None,
        transforms: ImageTransforms = ImageTransforms(),
        num_workers: int = 0,
        template: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=SETTINGS)
        self.save_hyperparameters(settings_hparams(transforms=transforms))
        self.root = Path(root).expanduser()
        self.dataset, self.source, self.way, self.shot, self.query = dataset, source, way, shot, query
        self.episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.seed, self.transforms, _ = seed, *check_settings(transforms)
        self.episodes_dir = Path(episodes_dir).expanduser() if episodes_dir else None
        self.num_workers = num_workers
        self.items, self.classnames = self._read(dataset, image_dir)
        if template is None:
            template = _episodic_spec(dataset).template if source == "imagefolder" else DEFAULT_TEMPLATE
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the class name; got {template!r}.")
        self.template = template
        self.sets: dict[str, ImageListDataset] = {}
        self.samplers: dict[str, EpisodeSampler] = {}

    def _read(self, dataset: str, image_dir: str) -> tuple[dict[str, list[Datum]], list[str]]:
        """Items of the train / val / test class splits with global labels, and all class names
        (underscores read as spaces, for text towers)."""
        if self.source == "imagefolder":
            items = _episodic_spec(dataset).read(self.root)
        elif self.source == "coop":
            split = read_split(self.root / f"split_zhou_{dataset}.json", self.root / image_dir, required=("train", "val", "test"))
            labels = sorted(label_to_classname(*split.values()))
            base = set(labels[: len(labels) // 2])
            items = {
                "train": [d for d in split["train"] if d.label in base],
                "val": [d for d in split["val"] if d.label not in base],
                "test": [d for d in split["test"] if d.label not in base],
            }
        else:
            raise ValueError(f"source must be 'imagefolder' or 'coop'; got {self.source!r}.")
        names_by_label = label_to_classname(*items.values())
        labels = sorted(names_by_label)
        if labels != list(range(len(labels))):
            raise ValueError(f"Episodic labels must be global and contiguous 0..n-1; got {labels[:8]} ...")
        return {k: items[k] for k in ("train", "val", "test")}, [names_by_label[i].replace("_", " ") for i in labels]

    @property
    def num_classes(self) -> int:
        """Classes over all splits (global labels index ``classnames``)."""
        return len(self.classnames)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.sets:
            return
        train_tf, test_tf = train_transform(self.transforms), test_transform(self.transforms)
        for key, items in self.items.items():
            self.sets[key] = ImageListDataset(items, train_tf if key == "train" else test_tf, name=f"episodic/{key}")
            seed = self.seed + {"train": 0, "val": 1_000_003, "test": 2_000_003}[key]
            fixed = None
            if key != "train" and self.episodes_dir is not None:
                fixed = load_or_create_episodes(
                    items, key, self.episodes_dir, self.way, self.shot, self.query, self.episodes[key], seed
                )  # fmt: skip
            labels = [d.label for d in items]
            self.samplers[key] = EpisodeSampler(labels, self.way, self.shot, self.query, self.episodes[key], seed, fixed=fixed)

    def _loader(self, key: str) -> DataLoader:
        if key not in self.sets:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        kwargs: dict = dict(
            batch_sampler=self.samplers[key], num_workers=self.num_workers,
            collate_fn=EpisodeCollate(self.way, self.shot, self.query), persistent_workers=self.num_workers > 0,
        )  # fmt: skip
        if key == "train":  # resumable mid-epoch (episodes are a function of seed + epoch)
            # what the saved episode position depends on, named if a mid-epoch resume changes it
            settings = {f"data.init_args.{k}": getattr(self, k) for k in ("way", "shot", "query", "seed")}
            settings["data.init_args.train_episodes"] = self.episodes["train"]
            return ResumableLoader(SeededDataset(self.sets[key]), settings=settings, **kwargs)
        return PassLoader(SeededDataset(self.sets[key]), **kwargs)

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
        transforms: ImageTransforms = MNIST_TRANSFORMS,
        num_workers: int = 0,
        template: str = "a photo of the digit {}.",
    ) -> None:
        data_dir = prepare_mnist(root if root is None else os.path.expanduser(root))
        super().__init__(
            root=str(data_dir), source="coop", dataset="MNIST", image_dir="images", way=way, shot=shot,
            query=query, train_episodes=train_episodes, val_episodes=val_episodes, test_episodes=test_episodes,
            seed=seed, transforms=transforms, num_workers=num_workers, template=template,
        )  # fmt: skip
        self.save_hyperparameters(ignore=SETTINGS)
        self.save_hyperparameters(settings_hparams(transforms=transforms))
