"""`DatasetDataModule`: any registered dataset, read from its standard layout, through the few-shot protocol.

`dataset` is a registry name (`vlm.datamodules.available_datasets()`): the spec's reader turns
`root` into split lists, and everything else (K-shot sampling with Dassl's semantics and its
index files, base/new class subsets, transforms, exact DDP evaluation) is `FewShotDataModule`'s.
Class names and the prompt template come with the dataset. Test-only datasets (ImageNet-V2/-Sketch/
-A/-R) serve `vlm test` after training on ImageNet; `train_split` picks VTAB's final-run split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlm.datamodules.dataset_specs import DatasetSpec, get_dataset
from vlm.datamodules.distributed import local_rank_zero
from vlm.datamodules.fewshot_datamodule import FewShotDataModule, SubsetName
from vlm.datamodules.image_list import OnCorrupt
from vlm.datamodules.splits import Datum, label_to_classname
from vlm.datamodules.settings import ImageTransforms, Loaders, SETTINGS, settings_hparams


class DatasetDataModule(FewShotDataModule):
    """A registered dataset under the CoOp few-shot / base-to-new protocol.

    Batches are `{"image", "label", "index"}` dicts; `test_dataloader` returns one loader per
    `test_subsets` entry. Arguments not listed here are `FewShotDataModule`'s.

    Args:
        root: the dataset folder in its standard layout (see `prepare.py check --dataset NAME`).
        dataset: registry name, e.g. "oxford_pets", "imagenet_a", "vtab_cifar", "cub", "hta_svhn".
        num_shots: K shots per class; 0 uses the full train split (VTAB, FGVC, HTA); negative is an error.
        template: prompt template; None uses the dataset's own (CoOp's per-dataset template).
        train_split: the split key used for training, e.g. "train800val200" for VTAB final runs.
        download: fetch missing raw files with torchvision before reading (first process of the
            node only; on clusters prefer `prepare.py check --download` once before the job).
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        num_shots: int = 16,
        seed: int = 1,
        subsample: SubsetName = "base",
        test_subsets: Sequence[SubsetName] = ("base", "new"),
        template: str | None = None,
        train_split: str = "train",
        download: bool = False,
        transforms: ImageTransforms = ImageTransforms(),
        loader: Loaders = Loaders(),
        strict_shots: bool = False,
        on_corrupt: OnCorrupt = "fail",
        check_files: bool = True,
        fewshot_cache_dir: str | None = None,
    ) -> None:
        self.spec: DatasetSpec = get_dataset(dataset)
        self.train_split = train_split
        if download and self.spec.prepare is not None and local_rank_zero():
            self.spec.prepare(Path(root).expanduser(), self.spec, True)
        super().__init__(
            root=root,
            dataset=dataset,
            image_dir=".",
            num_shots=num_shots,
            seed=seed,
            subsample=subsample,
            test_subsets=test_subsets,
            transforms=transforms,
            loader=loader,
            template=template if template is not None else self.spec.template,
            strict_shots=strict_shots,
            on_corrupt=on_corrupt,
            check_files=check_files,
            fewshot_cache_dir=fewshot_cache_dir or str(self._default_cache_dir(Path(root).expanduser())),
        )
        self.save_hyperparameters(ignore=SETTINGS)  # this class's own arguments, not the parent's
        self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))

    def _default_cache_dir(self, root: Path) -> Path:
        """`<root>/split_fewshot` (CoOp's place); per dataset when several share one root (VTAB, HTA)."""
        return root / "split_fewshot" if self.spec.family in ("coop", "imagenet_ood") else root / "split_fewshot" / self.spec.name

    def _load_split(self) -> dict[str, list[Datum]]:
        split = self.spec.read(self.root)
        if self.train_split not in split and not self.spec.test_only:
            raise ValueError(f"{self.spec.name} has splits {sorted(split)}; train_split={self.train_split!r} is not one.")
        return {
            "train": list(split.get(self.train_split, [])),
            "val": list(split.get("val", [])),
            "test": list(split.get("test", [])),
        }

    def _class_items(self) -> list[Datum]:
        """One item per class 0..K-1 (K: the dataset's class count, else the largest label + 1), named from the splits.

        A class absent from a small train split (VTAB's 800 images of 397 SUN classes) keeps its label.
        """
        names = label_to_classname(*self._split.values(), source=self.spec.name)
        declared = int(self.spec.options.get("num_classes", 0))  # type: ignore[call-overload]
        total = declared or (max(names) + 1 if names else 0)
        check_label_range(names, declared, f"{self.spec.name} under {self.root}")
        return [Datum("", y, names.get(y, f"class_{y}")) for y in range(total)] if total else []

    def templates(self, ensemble: str) -> list[str]:
        """A named template ensemble of the dataset (ImageNet family: "imagenet80", "imagenet7")."""
        if ensemble not in self.spec.ensembles:
            raise KeyError(f"{self.spec.name} has template ensembles {sorted(self.spec.ensembles)}, not {ensemble!r}.")
        return list(self.spec.ensembles[ensemble])

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and not self._split["train"]:
            raise ValueError(
                f"{self.spec.name} is a test-only dataset (domain generalisation): train on 'imagenet', then run "
                f"`vlm test` with this dataset's data config and the trained checkpoint."
            )
        super().setup(stage)

    def result_extras(self) -> dict[str, object]:
        """Recorded in results.json: skipped images, registry name, family, shots, seed and subsets."""
        return {
            **super().result_extras(),
            "registry_name": self.spec.name, "family": self.spec.family, "num_shots": self.num_shots,
            "seed": self.seed, "subsample": self.subsample, "test_subsets": list(self.test_subsets),
        }


def check_label_range(names: dict[int, str], declared: int, source: str) -> None:
    """Labels must be 0..K-1: K is the dataset's declared class count, else the labels must have no
    gap (a gap would become an imageless class "class_<y>" in the prompts and the accuracy). Raise a
    ``ValueError`` naming the missing or out-of-range labels otherwise."""
    labels = sorted(names)
    if not labels:
        return
    if labels[0] < 0 or (declared and labels[-1] >= declared):
        bad = [y for y in labels if y < 0 or (declared and y >= declared)]
        raise ValueError(
            f"{source}: labels {bad[:10]} are outside 0..{(declared or labels[-1] + 1) - 1}; the split's labels must "
            "count classes from 0."
        )
    if declared:
        return
    missing = sorted(set(range(labels[-1] + 1)) - set(labels))
    if missing:
        raise ValueError(
            f"{source}: the labels are not contiguous: {len(missing)} of 0..{labels[-1]} never occur ({missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}), in any split. Labels must be 0..n-1 without gaps: renumber the "
            "split file's labels (keeping their order), or remove the classes' entries consistently."
        )
