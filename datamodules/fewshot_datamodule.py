"""`FewShotDataModule`: CoOp few-shot and base-to-new data over a `split_zhou_<Name>.json` split.

The CoOp/CoCoOp protocol, end to end: read the split, draw the K-shot train / min(K, 4)-shot
val subset with Dassl's sampler (cached as `split_fewshot/shot_K-seed_S.json`), then apply
`subsample_classes` (train on "base", test on "base" and "new", each relabelled from 0).
Class names are read at `__init__` so LightningCLI links (`data.classnames -> model.classnames`,
`apply_on="instantiate"`) see them before `setup`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from vlm.datamodules.distributed import exact_eval_sampler
from vlm.datamodules.resumable import PassLoader, resumable_loader
from vlm.datamodules.fewshot import load_or_create_fewshot, subsample_classes
from vlm.datamodules.image_list import CollateSkipCorrupt, ImageListDataset, OnCorrupt
from vlm.datamodules.splits import Datum, check_images_exist, label_to_classname, read_split, split_file_path
from vlm.datamodules.settings import check_settings, ImageTransforms, Loaders, SETTINGS, settings_hparams, test_transform, train_transform

SubsetName = Literal["base", "new", "all"]


class FewShotDataModule(L.LightningDataModule):
    """Few-shot / base-to-new classification data over a CoOp split file.

    Batches are dicts `{"image": float [B, 3, H, W], "label": long [B], "index": long [B]}`.
    `test_dataloader` returns one loader per entry of `test_subsets`, in that order.

    Args:
        root: dataset folder holding `split_zhou_<dataset>.json` and the image folder (CoOp's
            `$DATA/<dataset_dir>`, e.g. `~/data/oxford_pets`).
        dataset: the split file's name part, e.g. "OxfordPets" for `split_zhou_OxfordPets.json`.
        image_dir: image root relative to `root` that the split's relpaths start from ("images";
            "" or "." when the relpaths start at `root` itself, as for StanfordCars).
        num_shots: K training shots per class (val uses min(K, 4)); 0 uses the full splits; negative is
            an error. A class with fewer than K train images keeps all of them (Dassl), with a warning;
            `results.json` records the shots actually used (`data.shots_used`).
        seed: few-shot sampling seed (Python `random`, as Dassl); seeds 1, 2, 3 in the papers.
        subsample: classes to train and validate on: "base" (first half of the sorted labels),
            "new" (second half) or "all".
        test_subsets: class subsets to test on, one loader each, e.g. ["base", "new"].
        transforms: image size, normalisation and training augmentations
            (:class:`~vlm.datamodules.settings.ImageTransforms`; CLIP's 224 px and mean/std by default).
        loader: batch sizes, workers, pinned memory (:class:`~vlm.datamodules.settings.Loaders`).
        template: hand-written prompt template; `prompts()` fills it with class names.
        strict_shots: raise if a class has fewer than K train (or min(K, 4) val) examples,
            instead of keeping all of them (Dassl's behaviour).
        on_corrupt: "fail" raises on an undecodable image, naming it; "skip" drops it from its
            batch and counts it (see `skipped_images`).
        check_files: verify in `prepare_data`/`setup` that every image used exists.
        fewshot_cache_dir: where the few-shot index files go; default `<root>/split_fewshot`.
        split_file: explicit split file path, overriding `<root>/split_zhou_<dataset>.json`.
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        image_dir: str = "images",
        num_shots: int = 16,
        seed: int = 1,
        subsample: SubsetName = "base",
        test_subsets: Sequence[SubsetName] = ("base", "new"),
        transforms: ImageTransforms = ImageTransforms(),
        loader: Loaders = Loaders(),
        template: str = "a photo of a {}.",
        strict_shots: bool = False,
        on_corrupt: OnCorrupt = "fail",
        check_files: bool = True,
        fewshot_cache_dir: str | None = None,
        split_file: str | None = None,
    ) -> None:
        super().__init__()
        if type(self).__init__ is FewShotDataModule.__init__:  # subclasses with own args save their own
            self.save_hyperparameters(ignore=SETTINGS)
            self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))
        if not isinstance(num_shots, int) or num_shots < 0:
            raise ValueError(
                f"num_shots must be a whole number >= 0 (K images per class; 0 = the full train split), got {num_shots!r}."
            )
        for name in (subsample, *test_subsets):
            if name not in ("base", "new", "all"):
                raise ValueError(f"Class subsets are 'base', 'new' or 'all'; got {name!r}.")
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}.")
        self.root = Path(root).expanduser()
        self.dataset = dataset
        self.image_root = self.root / image_dir if image_dir not in ("", ".") else self.root
        self.split_file = Path(split_file).expanduser() if split_file else split_file_path(self.root, dataset)
        self.fewshot_cache_dir = (
            Path(fewshot_cache_dir).expanduser() if fewshot_cache_dir else self.split_file.parent / "split_fewshot"
        )
        self.num_shots, self.seed, self.subsample = num_shots, seed, subsample
        self.test_subsets: list[str] = list(test_subsets)
        self.transforms, self.loader = check_settings(transforms, loader)
        self.template, self.strict_shots, self.on_corrupt = template, strict_shots, on_corrupt
        self.check_files = check_files

        self._split: dict[str, list[Datum]] = self._load_split()
        self.classnames: list[str] = self._subset_classnames(subsample)
        self.test_classnames: dict[str, list[str]] = {s: self._subset_classnames(s) for s in self.test_subsets}
        self.train_set: ImageListDataset | None = None
        self.val_set: ImageListDataset | None = None
        self.test_sets: list[ImageListDataset] = []
        self.predict_set: ImageListDataset | None = None
        self.shots_used: dict[str, object] | None = None

    # ----------------------------------------------------------------------------- class names
    def _load_split(self) -> dict[str, list[Datum]]:
        """The `{train, val, test}` Datum lists (subclasses read other layouts, e.g. the dataset registry)."""
        return read_split(self.split_file, self.image_root)

    def _class_items(self) -> list[Datum]:
        """Items whose labels define the class list and the base/new halves (CoOp: the train split)."""
        return self._split["train"]

    def _subset_classnames(self, subsample: str) -> list[str]:
        """Class names of a subset in its relabelled order (labels come from the train split, as CoOp)."""
        names = label_to_classname(self._class_items(), *self._split.values(), source=str(self.split_file))
        labels = sorted({d.label for d in self._class_items()})
        if labels != list(range(len(labels))):
            missing = sorted(set(range(max(labels) + 1)) - set(labels))[:10] if labels else []
            raise ValueError(
                f"'{self.split_file}': the train labels are not contiguous: they must be 0..n-1 without gaps, got "
                f"{labels[:10]}{' ...' if len(labels) > 10 else ''} (missing {missing}). Renumber the split's labels."
            )
        extra = sorted({d.label for items in self._split.values() for d in items} - set(labels))
        if extra:
            raise ValueError(f"'{self.split_file}': labels {extra[:10]} occur in val/test but not in train.")
        (picked,) = subsample_classes([Datum("", y, names[y]) for y in labels], subsample=subsample)
        return [d.classname for d in picked]

    @property
    def num_classes(self) -> int:
        """Number of training classes (after `subsample`)."""
        return len(self.classnames)

    def num_test_classes(self, subset: str) -> int:
        """Number of classes of one test subset."""
        return len(self.test_classnames[subset])

    def prompts(self, subset: str | None = None) -> list[str]:
        """`template` filled with each class name (underscores to spaces, as CoOp's prompt learners do)."""
        names = self.classnames if subset is None else self.test_classnames[subset]
        return [self.template.format(c.replace("_", " ")) for c in names]

    # ----------------------------------------------------------------------------- data
    def _fewshot(self) -> tuple[list[Datum], list[Datum]]:
        """The all-class few-shot (train, val), from the cache or freshly sampled (and cached)."""
        return load_or_create_fewshot(
            self._split, self.num_shots, self.seed, self.fewshot_cache_dir, strict=self.strict_shots
        )

    def _test_items(self, subset: str) -> list[Datum]:
        """Test items of one class subset, relabelled from 0 (label set from train, as CoOp)."""
        _, test = subsample_classes(self._class_items(), self._split["test"], subsample=subset)
        return test

    def _check(self, **splits: list[Datum]) -> None:
        if self.check_files:
            check_images_exist(splits, image_root=self.image_root)

    def prepare_data(self) -> None:
        """Rank 0 per node: verify the images and write the few-shot cache (no state is set)."""
        train, val = self._fewshot()
        self._check(train=train, val=val, test=self._split["test"])

    def _dataset(self, items: list[Datum], train: bool, name: str) -> ImageListDataset:
        tf = train_transform(self.transforms) if train else test_transform(self.transforms)
        return ImageListDataset(items, tf, on_corrupt=self.on_corrupt, name=f"{self.dataset}/{name}")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs: fit/validate -> train+val, test -> one per subset, predict."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            train, val = self._fewshot()
            train, val = subsample_classes(train, val, subsample=self.subsample)
            self.shots_used = shots_used(train, self.num_shots, f"{self.dataset} train[{self.subsample}]")
            self._check(train=train, val=val)
            self.train_set = self._dataset(train, True, f"train[{self.subsample}]")
            self.val_set = self._dataset(val, False, f"val[{self.subsample}]")
        if stage in (None, "test") and not self.test_sets:
            tests = {s: self._test_items(s) for s in self.test_subsets}
            self._check(**tests)
            self.test_sets = [self._dataset(tests[s], False, f"test[{s}]") for s in self.test_subsets]
        if stage in (None, "predict") and self.predict_set is None:
            test = self._test_items("all")
            self._check(test=test)
            self.predict_set = self._dataset(test, False, "test[all]")

    def _collate(self, ds: ImageListDataset) -> Callable[[list], Any]:
        """The batch collation of ``ds`` (subclasses with other sample layouts override it)."""
        size = self.transforms.image_size
        return CollateSkipCorrupt((3, size, size))

    def _loader(self, ds: ImageListDataset | None, batch_size: int, shuffle: bool, stage: str) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"Call setup('{stage}') before asking for its dataloader.")
        kwargs: dict = dict(
            num_workers=self.loader.num_workers,
            pin_memory=self.loader.pin_memory,
            persistent_workers=self.loader.num_workers > 0,
            collate_fn=self._collate(ds),
        )
        if shuffle:  # training: resumable mid-epoch, per-sample seeded augmentation
            return resumable_loader(ds, batch_size, settings=self.resume_settings(), **kwargs)
        return PassLoader(ds, batch_size=batch_size, sampler=exact_eval_sampler(ds), **kwargs)

    def resume_settings(self) -> dict[str, Any]:
        """The settings that choose the training set, saved with the training loader's mid-epoch
        state: a resume with other shots, sampling seed, dataset or class subset is refused with
        their names (vlm.datamodules.resumable), since the saved position indexes this set."""
        return {
            "data.init_args.dataset": self.dataset,
            "data.init_args.num_shots": self.num_shots,
            "data.init_args.seed": self.seed,
            "data.init_args.subsample": self.subsample,
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled few-shot train set of the training subset."""
        return self._loader(self.train_set, self.loader.batch_size, True, "fit")

    def val_dataloader(self) -> DataLoader:
        """Few-shot val set (min(K, 4) per class) of the training subset."""
        return self._loader(self.val_set, self.loader.eval_batch_size, False, "fit")

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per `test_subsets` entry, in that order (see `test_classnames`)."""
        if not self.test_sets:
            raise RuntimeError("Call setup('test') before asking for its dataloaders.")
        return [self._loader(ds, self.loader.eval_batch_size, False, "test") for ds in self.test_sets]

    def predict_dataloader(self) -> DataLoader:
        """The full test set over all classes, original labels."""
        return self._loader(self.predict_set, self.loader.eval_batch_size, False, "predict")

    # ----------------------------------------------------------------------------- bookkeeping
    def skipped_images(self) -> list[str]:
        """Corrupt images skipped so far (on_corrupt='skip'), over every dataset built."""
        sets = [self.train_set, self.val_set, *self.test_sets, self.predict_set]
        return [p for ds in sets if ds is not None for p in ds.skipped_paths]

    def result_extras(self) -> dict[str, object]:
        """Recorded in results.json under `data`: how many corrupt images were skipped (this process's
        datasets; on_corrupt='skip') and the first 20 of their paths."""
        skipped = self.skipped_images()
        out: dict[str, object] = {"on_corrupt": self.on_corrupt, "skipped_images": len(skipped), "skipped_paths": skipped[:20]}
        if self.shots_used is None and self._split.get("train"):  # a test-only run: the shots the fit drew
            train, _ = subsample_classes(*self._fewshot(), subsample=self.subsample)
            self.shots_used = shots_used(train, self.num_shots, f"{self.dataset} train[{self.subsample}]", warn=False)
        if self.shots_used is not None:
            out["shots_used"] = self.shots_used
        return out


def shots_used(train: list[Datum], num_shots: int, name: str, warn: bool = True) -> dict[str, object]:
    """The train images per class actually drawn: min/max, and the classes below `num_shots`
    (which keep all their images, Dassl's non-strict behaviour), warned about once."""
    counts: dict[str, int] = {}
    for d in train:
        counts[d.classname] = counts.get(d.classname, 0) + 1
    short = {c: n for c, n in counts.items() if num_shots > 0 and n < num_shots}
    if short and warn:
        shown = ", ".join(f"{c!r}: {n}" for c, n in list(short.items())[:5])
        rank_zero_warn(
            f"num_shots={num_shots}, but {len(short)} of {len(counts)} classes of {name} have fewer train images "
            f"({shown}{', ...' if len(short) > 5 else ''}); they are used with all they have. results.json records "
            "the shots used (data.shots_used); set strict_shots=true to make this an error."
        )
    return {
        "requested": num_shots,
        "min": min(counts.values(), default=0),
        "max": max(counts.values(), default=0),
        "classes_below_requested": dict(list(short.items())[:50]),
        "num_classes_below_requested": len(short),
    }
