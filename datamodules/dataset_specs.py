"""The dataset registry: registry name -> `DatasetSpec` (how to read a root into split lists).

Every supported dataset is one small `DatasetSpec`: a reader that turns a dataset root in its
standard on-disk layout into `{split: [Datum, ...]}` (labels 0..n-1, class names embedded in
each Datum), the prompt template(s) that belong to it, a description of the layout, and,
where one exists, a `prepare` step that writes missing derived files (a generated split, PNG
exports of pickled datasets) and a torchvision downloader. Readers live in `readers_*.py`
and register themselves at import; `vlm.datamodules` imports them all.

A missing or malformed root raises `DatasetLayoutError`, whose message names the expected
layout and the command that prepares it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlm.datamodules.splits import Datum
from vlm.datamodules.templates import DEFAULT_TEMPLATE

Split = dict[str, list[Datum]]
Reader = Callable[[Path, "DatasetSpec"], Split]
Preparer = Callable[[Path, "DatasetSpec", bool], list[Path]]
PREPARE_SCRIPT = "python scripts/data/prepare.py"


class DatasetLayoutError(FileNotFoundError):
    """A dataset root that is missing or not in the layout its reader expects."""


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    Attributes:
        name: registry name (lowercase), e.g. "oxford_pets".
        family: "coop", "imagenet_ood", "vtab", "fgvc", "hta" or "episodic".
        reader: `reader(root, spec) -> {split: [Datum]}`.
        layout: the expected on-disk layout under the root, as shown in errors.
        template: the dataset's hand-written prompt template (CoOp's `CUSTOM_TEMPLATES` entry).
        ensembles: named template ensembles (ImageNet's 80 and 7 templates).
        options: reader-specific constants (folder names, split-file name, class counts...).
        prepare: optional `prepare(root, spec, download) -> written paths`: writes what is missing.
        download: optional `download(root)`: fetches the raw files (torchvision, for users online).
        test_only: the dataset has only a test split (the ImageNet OOD variants).
    """

    name: str
    family: str
    reader: Reader
    layout: str
    template: str = DEFAULT_TEMPLATE
    ensembles: Mapping[str, Sequence[str]] = field(default_factory=dict)
    options: Mapping[str, object] = field(default_factory=dict)
    prepare: Preparer | None = None
    download: Callable[[Path], None] | None = None
    test_only: bool = False

    def prepare_command(self, root: str | os.PathLike[str]) -> str:
        """The shell command that checks (and, where possible, completes) a root of this dataset."""
        extra = " --download" if self.download is not None else ""
        return f"{PREPARE_SCRIPT} check --dataset {self.name} --root {root}{extra}"

    def layout_error(self, root: str | os.PathLike[str], problem: str) -> DatasetLayoutError:
        """A `DatasetLayoutError` naming the problem, the expected layout and the preparing command."""
        return DatasetLayoutError(
            f"{self.name}: {problem}\nExpected layout under '{root}':\n{self.layout}\n"
            f"Prepare or check it with: {self.prepare_command(root)}"
        )

    def read(self, root: str | os.PathLike[str]) -> Split:
        """Read `root` into `{split: [Datum]}`, raising `DatasetLayoutError` on a missing root."""
        path = Path(root).expanduser()
        if not path.is_dir():
            raise self.layout_error(path, f"the dataset root '{path}' does not exist.")
        split = self.reader(path, self)
        if not any(split.values()):
            raise self.layout_error(path, "the root holds no images in the expected places.")
        return split


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a spec to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Dataset '{spec.name}' is registered twice.")
    _REGISTRY[spec.name] = spec
    return spec


def available_datasets(family: str | None = None) -> list[str]:
    """Registered dataset names, sorted, optionally of one family."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a registered dataset; an unknown name lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"Unknown dataset {name!r}. Available: {', '.join(available_datasets())}.") from None


def require_file(spec: DatasetSpec, root: Path, rel: str) -> Path:
    """`root/rel`, or a layout error naming it."""
    path = root / rel
    if not path.is_file():
        raise spec.layout_error(root, f"missing file '{path}'.")
    return path


def require_dir(spec: DatasetSpec, root: Path, rel: str) -> Path:
    """`root/rel` as an existing folder, or a layout error naming it."""
    path = root / rel if rel not in ("", ".") else root
    if not path.is_dir():
        raise spec.layout_error(root, f"missing folder '{path}'.")
    return path


def first_existing_dir(spec: DatasetSpec, root: Path, candidates: Sequence[str]) -> Path:
    """The first of several accepted sub-folders that exists (e.g. the CoOp or the torchvision layout)."""
    for rel in candidates:
        path = root / rel if rel not in ("", ".") else root
        if path.is_dir():
            return path
    tried = ", ".join(f"'{root / c}'" for c in candidates)
    raise spec.layout_error(root, f"none of the accepted image folders exists: {tried}.")


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_EXTENSIONS)


def class_folders(folder: Path, ignore: Sequence[str] = ()) -> list[str]:
    """Sub-folder names of `folder`, sorted (the ImageFolder class order), minus `ignore`."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in ignore)


def datum(image_root: Path, relpath: str, label: int, classname: str) -> Datum:
    """A Datum whose impath is `image_root/relpath`."""
    return Datum(str(image_root / relpath), int(label), classname, relpath)


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """CoOp's `classnames.txt`: lines `<wnid> <class name with spaces>`."""
    names: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = name.strip()
    return names
