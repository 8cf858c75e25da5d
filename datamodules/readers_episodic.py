"""Episodic few-shot datasets: miniImageNet, tieredImageNet, CIFAR-FS, FC100.

Read layout: the ImageFolder trees that SemanticPrompt/SAA distribute,
`<root>/{base,val,novel}/<class>/<image>` (meta-train / meta-val / meta-test classes), which we
map to the splits "train", "val", "test". miniImageNet's original release (`images/` plus
`{train,val,test}.csv` with `filename,label`) is read as well. Classes of the three splits are
disjoint; labels are global (train classes first), so one label always means one class.
WNID folders (mini/tiered) are named through `<root>/classnames.txt` (`<wnid> <name>`) if present.
Episodes (sampling, stored index files, the 95 % interval) and the episodic datamodule: `vlm.datamodules.episodic`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from vlm.datamodules.dataset_specs import (
    DatasetSpec,
    Split,
    class_folders,
    datum,
    list_images,
    read_wnid_classnames,
    register_dataset,
    require_dir,
)

EPISODIC_SPLITS = {"train": "base", "val": "val", "test": "novel"}


def _names(root: Path) -> dict[str, str]:
    path = root / "classnames.txt"
    return read_wnid_classnames(path) if path.is_file() else {}


def _from_csv(root: Path, spec: DatasetSpec) -> Split:
    """miniImageNet's release: `images/<file>` listed in `{train,val,test}.csv` (`filename,label`)."""
    image_root = require_dir(spec, root, "images")
    names, split, next_label = _names(root), {}, 0
    for key in ("train", "val", "test"):
        path = root / f"{key}.csv"
        if not path.is_file():
            raise spec.layout_error(root, f"missing '{path}' (the csv layout needs train.csv, val.csv and test.csv).")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and set(rows[0]) != {"filename", "label"}:
            raise spec.layout_error(root, f"'{path}' must have the header 'filename,label', got {list(rows[0])}.")
        labels: dict[str, int] = {}
        for r in rows:
            labels.setdefault(r["label"], next_label + len(labels))
        next_label += len(labels)
        split[key] = [datum(image_root, r["filename"], labels[r["label"]], names.get(r["label"], r["label"])) for r in rows]
    return split


def read_episodic(root: Path, spec: DatasetSpec) -> Split:
    """`{base,val,novel}/<class>/*` (or miniImageNet's csv layout) with global, disjoint labels."""
    if not (root / "base").is_dir() and (root / "train.csv").is_file():
        return _from_csv(root, spec)
    names, split, next_label = _names(root), {}, 0
    for key, folder_name in EPISODIC_SPLITS.items():
        folder = require_dir(spec, root, folder_name)
        items = []
        for i, cls in enumerate(class_folders(folder)):
            name = names.get(cls, cls.replace("_", " "))
            items += [datum(folder, f"{cls}/{p.name}", next_label + i, name) for p in list_images(folder / cls)]
        next_label += len(class_folders(folder))
        split[key] = items
    return split


_EPISODIC = {
    "mini_imagenet": "64/16/20 ImageNet classes (WNID folders)",
    "tiered_imagenet": "351/97/160 ImageNet classes (WNID folders)",
    "cifar_fs": "64/16/20 CIFAR-100 classes (class-name folders)",
    "fc100": "60/20/20 CIFAR-100 classes split by superclass (class-name folders)",
}
for _name, _what in _EPISODIC.items():
    register_dataset(
        DatasetSpec(
            name=_name,
            family="episodic",
            reader=read_episodic,
            layout=(
                f"  <root>/base/<class>/*, <root>/val/<class>/*, <root>/novel/<class>/*   ({_what})\n"
                "  optional <root>/classnames.txt ('<wnid> <name>')"
                + ("; or <root>/images/* with <root>/{train,val,test}.csv" if _name == "mini_imagenet" else "")
            ),
        )
    )
