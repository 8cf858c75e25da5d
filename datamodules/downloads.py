"""Raw-file downloads through torchvision's dataset classes, and why the other datasets have none.

Where torchvision has a class for a registered dataset, `TorchvisionDownload` constructs it with
`download=True` under the folder the dataset's reader looks in (torchvision then fetches and
unpacks the archives, skipping what is already there). `prepare.py check --download` runs it.
Every registered dataset without a downloader is listed in `NO_DOWNLOAD` with the reason, so
`download_support(spec)` can always say what a user has to do (tests keep the two in sync).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.datamodules.dataset_specs import DatasetSpec


@dataclass(frozen=True)
class TorchvisionDownload:
    """Calls `torchvision.datasets.<cls_name>(<root>/<subdir>, download=True, **kwargs)` once per `calls` entry.

    Attributes:
        cls_name: the torchvision dataset class, e.g. "DTD".
        subdir: folder under the dataset root handed to torchvision as its `root` ("" = the root itself).
        calls: keyword arguments of each constructor call; several calls fetch several parts
            (SVHN and GTSRB download the train and the test archives separately).
    """

    cls_name: str
    subdir: str = ""
    calls: Sequence[Mapping[str, Any]] = field(default_factory=lambda: ({},))

    def target(self, root: Path) -> Path:
        """The folder torchvision downloads into for the dataset root `root`."""
        return root / self.subdir if self.subdir else root

    def __call__(self, root: Path) -> None:
        import torchvision.datasets as tvd

        target = self.target(Path(root))
        target.mkdir(parents=True, exist_ok=True)
        cls = getattr(tvd, self.cls_name)
        for kwargs in self.calls:
            cls(str(target), download=True, **dict(kwargs))

    def describe(self) -> str:
        """One line for `prepare.py list` and the docs."""
        where = f" into <root>/{self.subdir}" if self.subdir else ""
        parts = "" if len(self.calls) == 1 else " (" + ", ".join(f"{dict(c)}" for c in self.calls) + ")"
        return f"torchvision.datasets.{self.cls_name}{where}{parts}"


_VTAB = "VTAB-1k comes from TFDS: scripts/data/import_vtab_tfds.py (needs tensorflow_datasets), or a NOAH export"
_VPT_JSON = "no torchvision class; images from the dataset's site, split JSONs from VPT"
_EPISODIC = "ImageFolder tarballs (SemanticPrompt) or the pickle releases via scripts/data/import_episodic.py"
_OOD = "no torchvision class; download from the dataset's site (CoOp DATASETS.md)"

NO_DOWNLOAD: dict[str, str] = {
    "imagenet": "torchvision.datasets.ImageNet cannot download (licence); it only parses local archives",
    "stanford_cars": "torchvision.datasets.StanfordCars.download raises: the original URL is broken",
    "fgvc_cars": "torchvision.datasets.StanfordCars.download raises: the original URL is broken",
    "ucf101": "torchvision.datasets.UCF101 holds videos; CoOp's mid-frames are only on the authors' Google Drive",
    "imagenetv2": _OOD, "imagenet_sketch": _OOD, "imagenet_a": _OOD, "imagenet_r": _OOD,
    "cub": _VPT_JSON, "nabirds": _VPT_JSON, "stanford_dogs": _VPT_JSON,
    "hta_cub": _VPT_JSON, "hta_nabirds": _VPT_JSON, "hta_stanford_dogs": _VPT_JSON,
    "mini_imagenet": _EPISODIC, "tiered_imagenet": _EPISODIC, "cifar_fs": _EPISODIC, "fc100": _EPISODIC,
}  # fmt: skip
VTAB_NO_DOWNLOAD = _VTAB


def no_download_reason(name: str) -> str | None:
    """Why the registered dataset `name` has no downloader (None if it is not listed)."""
    if name.startswith("vtab_"):
        return VTAB_NO_DOWNLOAD
    return NO_DOWNLOAD.get(name)


def download_support(spec: DatasetSpec) -> str:
    """"torchvision.datasets.X ..." for a wired dataset, else "no: <reason>"."""
    if isinstance(spec.download, TorchvisionDownload):
        return spec.download.describe()
    return f"no: {no_download_reason(spec.name) or 'manual'}"
