"""CoOp-style split files (`split_zhou_<Name>.json`) over an image root.

CoOp/Dassl datasets store their train/val/test lists as
`{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`, with paths
relative to the image root and 0-based labels. This module reads them into `Datum` records
(Dassl's record, minus the domain field) and fails early, with errors that name the problem
and the fix, when the layout, the JSON or the image files are not what the split promises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")
LAYOUT_HELP = (
    "Expected layout (CoOp DATASETS.md): <root>/split_zhou_<Name>.json and the images under "
    "<root>/<image_dir>/<relpath>, one relpath per split entry [relpath, label, classname]."
)


@dataclass(frozen=True)
class Datum:
    """One labelled image, as Dassl's `Datum`: absolute `impath`, 0-based `label`, `classname`.

    `relpath` is the path as written in the split file (relative to the image root); the few-shot
    cache stores it so the cache does not depend on where the data lives.
    """

    impath: str
    label: int
    classname: str
    relpath: str = ""


def split_file_path(root: str | os.PathLike[str], dataset: str) -> Path:
    """The CoOp split file of `dataset` under `root`: `<root>/split_zhou_<dataset>.json`."""
    return Path(root).expanduser() / f"split_zhou_{dataset}.json"


def _check_split_file(split_file: Path) -> None:
    """Raise a FileNotFoundError that names the missing root or split file and the layout."""
    root = split_file.parent
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset root '{root}' does not exist. {LAYOUT_HELP} "
            "Set `root` to the folder that holds the split file."
        )
    if not split_file.is_file():
        found = sorted(p.name for p in root.glob("split_zhou_*.json"))
        hint = f" Split files found in that folder: {found}." if found else ""
        raise FileNotFoundError(
            f"Split file '{split_file}' not found.{hint} {LAYOUT_HELP} "
            "Download the CoOp split file into the dataset root, or fix `root`/`dataset`."
        )


def _parse_entries(entries: object, key: str, image_root: Path, source: Path) -> list[Datum]:
    """Turn the `[relpath, label, classname]` lists of one split key into Datums, validating each."""
    if not isinstance(entries, list):
        raise ValueError(
            f"Malformed split file '{source}': '{key}' must be a list of [relpath, label, classname] "
            f"entries, got {type(entries).__name__}."
        )
    items: list[Datum] = []
    for i, entry in enumerate(entries):
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[0] != ""
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
            and entry[1] >= 0
            and isinstance(entry[2], str)
        )
        if not ok:
            raise ValueError(
                f"Malformed split file '{source}': entry {i} of '{key}' is {entry!r}; each entry must be "
                "[relpath: str, label: int >= 0, classname: str]. Regenerate or fix the split file."
            )
        relpath, label, classname = entry
        items.append(Datum(str(image_root / relpath), int(label), classname, relpath))
    return items


def read_split(
    split_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    required: Sequence[str] = ("train", "test"),
    check_files: bool = False,
) -> dict[str, list[Datum]]:
    """Read a CoOp split file into `{key: [Datum, ...]}` for every list-valued key it holds.

    `required` keys must be present (a missing "val" is allowed by default: ImageNet-style
    datasets have none). Extra keys (e.g. MNIST's "pretrain") are read as well. Labels must map
    to one class name each across all keys. With `check_files`, every image must exist.
    """
    path = Path(split_file).expanduser()
    _check_split_file(path)
    try:
        with path.open("r", encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"Split file '{path}' is not valid JSON ({e}). Re-download or regenerate it."
        ) from e
    if not isinstance(raw, dict):
        raise ValueError(
            f"Malformed split file '{path}': the top level must be an object with keys {SPLIT_KEYS}, "
            f"got {type(raw).__name__}."
        )
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(
            f"Malformed split file '{path}': missing key(s) {missing}; found {sorted(raw)}. "
            f"A CoOp split file holds {SPLIT_KEYS}."
        )
    root = Path(image_root).expanduser()
    known = set(SPLIT_KEYS) | set(required)  # these must be entry lists; other keys only when they are lists
    split = {k: _parse_entries(v, k, root, path) for k, v in raw.items() if k in known or isinstance(v, list)}
    label_to_classname(*split.values(), source=str(path))
    if check_files:
        check_images_exist(split, image_root=root)
    return split


def check_images_exist(
    split: Mapping[str, Sequence[Datum]], image_root: str | os.PathLike[str] | None = None, show: int = 5
) -> None:
    """Raise FileNotFoundError listing how many split images are missing and the first few paths."""
    missing: list[str] = []
    total = 0
    for items in split.values():
        for d in items:
            total += 1
            if not os.path.isfile(d.impath):
                missing.append(d.impath)
    if not missing:
        return
    where = f" under image root '{image_root}'" if image_root is not None else ""
    root_hint = ""
    if image_root is not None and not Path(image_root).is_dir():
        root_hint = f" The image root itself does not exist: check `image_dir`. {LAYOUT_HELP}"
    raise FileNotFoundError(
        f"{len(missing)} of {total} images listed in the split are missing{where}; first "
        f"{min(show, len(missing))}: {missing[:show]}.{root_hint} Download the full dataset, "
        "or point `root`/`image_dir` at the folder the split's relative paths start from."
    )


def label_to_classname(*splits: Iterable[Datum], source: str = "split") -> dict[int, str]:
    """Map each label to its class name (as Dassl's `get_lab2cname`), rejecting conflicting names."""
    mapping: dict[int, str] = {}
    for items in splits:
        for d in items:
            seen = mapping.setdefault(d.label, d.classname)
            if seen != d.classname:
                raise ValueError(
                    f"Inconsistent {source}: label {d.label} is named both {seen!r} and "
                    f"{d.classname!r} (e.g. at '{d.relpath or d.impath}'). Each label needs one class name."
                )
    return mapping


def classnames_in_label_order(items: Iterable[Datum]) -> list[str]:
    """Class names ordered by label (labels must be 0..n-1 without gaps), as CoOp's `classnames`."""
    mapping = label_to_classname(items)
    labels = sorted(mapping)
    if labels != list(range(len(labels))):
        raise ValueError(f"Labels must be contiguous from 0, got {labels[:10]}... ({len(labels)} labels).")
    return [mapping[i] for i in labels]
