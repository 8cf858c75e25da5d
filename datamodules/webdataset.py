"""`ShardDataModule`: train from webdataset shards, evaluate exactly from the same shards, map-style.

Shards come from `scripts/data/prepare.py shards` (one folder per split, each with `manifest.json`).

Training streams `webdataset.WebDataset` in one of two modes, both deadlock-free under DDP
because every rank and worker yields exactly the same number of batches per epoch:
* `"resampled"` (default, webdataset's recommendation): shards are drawn with replacement per
  rank and worker, an endless stream cut by `with_epoch`;
* `"split"`: `split_by_node` + `split_by_worker` over a repeated shard list (each rank reads its
  own shards; needs `num_shards >= world_size * workers`), also cut by `with_epoch`.
Epoch length = `count // (batch_size * world_size)` batches per rank (at least one).

Validation and test read the shards through `ShardIndexDataset` (a tar index, random access) with an
unpadded per-rank sampler, so every sample is counted once. Base/new subsets follow CoOp:
base = first ceil(n/2) labels, relabelled from 0, new = the rest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from vlm.datamodules.distributed import exact_eval_sampler, rank_and_world
from vlm.datamodules.shards import ShardIndexDataset, read_manifest
from vlm.datamodules.settings import check_settings, ImageTransforms, Loaders, SETTINGS, settings_hparams, test_transform, train_transform
from vlm.datamodules.transforms import to_rgb

SubsetName = Literal["base", "new", "all"]
IMAGE_KEYS = "jpg;png;ppm;bmp;webp"


def subset_labels(num_classes: int, subset: str) -> list[int]:
    """CoOp's `subsample_classes` on labels 0..n-1: base = first ceil(n/2), new = the rest, all = every label."""
    if subset not in ("base", "new", "all"):
        raise ValueError(f"Class subsets are 'base', 'new' or 'all'; got {subset!r}.")
    m = math.ceil(num_classes / 2)
    return list(range(m)) if subset == "base" else list(range(m, num_classes)) if subset == "new" else list(range(num_classes))


class _ToItem:
    """(image, cls, json) tuple -> `{"image", "label", "index"}`, relabelling kept classes (picklable for workers)."""

    def __init__(self, transform: Any, relabel: dict[int, int]) -> None:
        self.transform, self.relabel = transform, relabel

    def __call__(self, sample: tuple[Any, Any, dict[str, Any]]) -> dict[str, torch.Tensor]:
        image, label, info = sample
        return {
            "image": self.transform(to_rgb(image)),
            "label": torch.tensor(self.relabel[int(label)]),
            "index": torch.tensor(int(info["index"])),
        }


class _KeepLabels:
    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = {str(y) for y in labels}

    def __call__(self, sample: dict[str, Any]) -> bool:
        raw = sample["cls"]
        return (raw.decode() if isinstance(raw, bytes) else str(raw)).strip() in self.labels


class ShardDataModule(L.LightningDataModule):
    """Few-shot / base-to-new classification from shard folders; batches as `FewShotDataModule`'s.

    Args:
        train_shards: folder of the training shards (with manifest.json).
        val_shards: folder of the validation shards, or None.
        test_shards: folder of the test shards, or None.
        dataset: dataset name recorded in results.json (default: the train manifest's).
        subsample: classes to train and validate on ("base", "new", "all").
        test_subsets: class subsets to test on, one loader each.
        mode: "resampled" (with replacement) or "split" (split_by_node / split_by_worker).
        shuffle_buffer: in-memory sample shuffle buffer of the training stream.
        seed: shard-shuffle seed of the training stream (also offset by rank and worker).
        template: prompt template for `prompts()`.
        transforms: image size, normalisation and augmentations (``ImageTransforms``), as `FewShotDataModule`.
        loader: per-process batch sizes and workers (``Loaders``; ``pin_memory`` applies to evaluation).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        test_shards: str | None = None,
        dataset: str | None = None,
        subsample: SubsetName = "base",
        test_subsets: Sequence[SubsetName] = ("base", "new"),
        mode: Literal["resampled", "split"] = "resampled",
        shuffle_buffer: int = 1000,
        seed: int = 1,
        template: str = "a photo of a {}.",
        transforms: ImageTransforms = ImageTransforms(),
        loader: Loaders = Loaders(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=SETTINGS)
        self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))
        if mode not in ("resampled", "split"):
            raise ValueError(f"mode must be 'resampled' or 'split', got {mode!r}.")
        self.train_dir = Path(train_shards).expanduser()
        self.manifest = read_manifest(self.train_dir)
        self.dataset = dataset or self.manifest.get("dataset") or self.train_dir.name
        self.all_classnames: list[str] = list(self.manifest["classnames"])
        self.subsample, self.test_subsets = subsample, list(test_subsets)
        self.classnames = [self.all_classnames[y] for y in subset_labels(len(self.all_classnames), subsample)]
        self.test_classnames = {
            s: [self.all_classnames[y] for y in subset_labels(len(self.all_classnames), s)] for s in self.test_subsets
        }
        self.val_dir = Path(val_shards).expanduser() if val_shards else None
        self.test_dir = Path(test_shards).expanduser() if test_shards else None
        self.mode, self.shuffle_buffer, self.seed, self.template = mode, shuffle_buffer, seed, template
        self.transforms, self.loader = check_settings(transforms, loader)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, subset: str | None = None) -> list[str]:
        names = self.classnames if subset is None else self.test_classnames[subset]
        return [self.template.format(c.replace("_", " ")) for c in names]

    def _eval_transform(self) -> Any:
        return test_transform(self.transforms)

    def batches_per_epoch(self, world_size: int) -> int:
        """Batches each rank yields per epoch: the train samples of the subset over the global batch."""
        keep = set(subset_labels(len(self.all_classnames), self.subsample))
        count = sum(c for y, c in enumerate(self.manifest["class_counts"]) if y in keep)
        return max(1, count // (self.loader.batch_size * world_size))

    def train_dataloader(self) -> wds.WebLoader:
        """The shard stream: every rank and worker yields the same number of full batches."""
        _, world = rank_and_world()
        urls = [str(self.train_dir / s["url"]) for s in self.manifest["shards"]]
        workers = max(1, self.loader.num_workers)
        if self.mode == "split" and len(urls) < world * workers:
            raise ValueError(
                f"mode='split' needs at least world_size x workers = {world * workers} shards; {self.train_dir} has "
                f"{len(urls)}. Re-shard with a smaller --shard-size, or use mode='resampled'."
            )
        keep = subset_labels(len(self.all_classnames), self.subsample)
        tf = train_transform(self.transforms)
        if self.mode == "resampled":
            ds = wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None, seed=self.seed)
        else:
            ds = wds.WebDataset(urls, repeat=True, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                                workersplitter=wds.split_by_worker, seed=self.seed)  # fmt: skip
        nbatches = self.batches_per_epoch(world)
        per_worker = math.ceil(nbatches / workers)
        pipeline = (
            ds.select(_KeepLabels(keep))
            .shuffle(self.shuffle_buffer)
            .decode("pil")
            .to_tuple(IMAGE_KEYS, "cls", "json")
            .map(_ToItem(tf, {y: i for i, y in enumerate(keep)}))
            .batched(self.loader.batch_size, partial=False)
            .with_epoch(per_worker)
        )
        n = self.loader.num_workers
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=n, persistent_workers=n > 0)
        with warnings.catch_warnings():  # with_length only tells Lightning the batch count; with_epoch sets it
            warnings.simplefilter("ignore", UserWarning)
            return loader.with_length(per_worker * workers)

    def _eval_loader(self, folder: Path | None, subset: str, stage: str) -> DataLoader:
        if folder is None:
            raise RuntimeError(f"No {stage} shards were given (set `{stage}_shards`).")
        ds = ShardIndexDataset(folder, self._eval_transform(), subset_labels(len(self.all_classnames), subset))
        return DataLoader(ds, batch_size=self.loader.eval_batch_size, shuffle=False, sampler=exact_eval_sampler(ds),
                          num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory)  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_dir, self.subsample, "val") if self.val_dir is not None else []

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.test_dir, s, "test") for s in self.test_subsets]
