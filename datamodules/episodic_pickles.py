"""Import the pickle releases of tieredImageNet, CIFAR-FS and FC100 into the `{base,val,novel}/<class>/` tree.

Formats (as the episodic few-shot benchmarks distribute them):

* CIFAR-FS / FC100 (MetaOptNet): `CIFAR_FS_{train,val,test}.pickle` / `FC100_{train,val,test}.pickle`,
  each a dict with `data` (uint8 N x 32 x 32 x 3) and `labels` (CIFAR-100 fine-label ids).
  Class folders are named by the CIFAR-100 class name of the id.
* tieredImageNet: `{train,val,test}_labels.pkl` (dict with per-image `label_specific` ids and
  the `label_specific_str` name of each id) plus the images as `{split}_images.npz` (key `images`, N x 84 x 84 x 3;
  MetaOptNet's packaging, read with `numpy.load(allow_pickle=False)`) or the original
  `{split}_images_png.pkl` (a list of PNG-encoded byte arrays, written out unchanged).

Splits map train -> base, val -> val, test -> novel, so `episodic` registry entries read the output.
Unpickling runs code from the file: only pass these trusted dataset files, which this module
loads solely from the paths the user names (nothing is downloaded).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_FOLDERS = {"train": "base", "val": "val", "test": "novel"}
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
PREFIXES = {"cifar_fs": "CIFAR_FS", "fc100": "FC100"}


def load_trusted_pickle(path: Path) -> Any:
    """Unpickle a dataset file the user passed (latin1, as these Python 2 pickles need). Trusted files only."""
    with Path(path).open("rb") as f:
        return pickle.load(f, encoding="latin1")


def _png_bytes(image: Any) -> bytes:
    """PNG bytes as shipped (a bytes-like / uint8 byte array) or encoded from an H x W x 3 array."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    arr = np.asarray(image)
    if arr.ndim == 1:  # an encoded file stored as a uint8 vector
        return arr.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_split(out: Path, split: str, images: Iterable[Any], classes: Sequence[str]) -> int:
    """Write `out/<base|val|novel>/<class>/<NNNNNN>.png` for each (image, class) pair; return the count."""
    folder = Path(out) / SPLIT_FOLDERS[split]
    n = 0
    for n, (image, cls) in enumerate(zip(images, classes, strict=True), start=1):
        path = folder / cls / f"{n - 1:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(image))
    return n


def import_cifar_pickles(src: Path, out: Path, dataset: str) -> dict[str, int]:
    """CIFAR-FS or FC100 (`dataset` = "cifar_fs" | "fc100") from `src/<PREFIX>_{train,val,test}.pickle`."""
    counts = {}
    for split in SPLIT_FOLDERS:
        path = Path(src) / f"{PREFIXES[dataset]}_{split}.pickle"
        raw = load_trusted_pickle(path)
        data, labels = np.asarray(raw["data"], dtype=np.uint8), np.asarray(raw["labels"], dtype=np.int64)
        if data.ndim != 4 or data.shape[-1] != 3 or len(data) != len(labels):
            raise ValueError(f"'{path}': expected data N x H x W x 3 and N labels, got {data.shape} and {labels.shape}.")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(CIFAR100_CLASSES):
            raise ValueError(f"'{path}': labels must be CIFAR-100 fine-label ids 0..99.")
        counts[split] = write_split(out, split, data, [CIFAR100_CLASSES[y] for y in labels])
    return counts


def _tiered_classes(labels: dict[str, Any], path: Path) -> list[str]:
    """Per-image class folder names: `label_specific_str[label_specific[i]]` (the names are a lookup table)."""
    ids = [int(y) for y in np.asarray(labels["label_specific"]).reshape(-1)]
    names = [str(s) for s in labels.get("label_specific_str", [])]
    if not names:
        return [f"class_{y:03d}" for y in ids]
    if ids and not 0 <= min(ids) <= max(ids) < len(names):
        raise ValueError(f"'{path}': label_specific_str has {len(names)} names but the labels reach {max(ids)}.")
    return [names[y] for y in ids]


def import_tiered(src: Path, out: Path) -> dict[str, int]:
    """tieredImageNet from `src/{split}_labels.pkl` + `{split}_images.npz` (preferred) or `{split}_images_png.pkl`."""
    counts = {}
    for split in SPLIT_FOLDERS:
        labels_path = Path(src) / f"{split}_labels.pkl"
        classes = _tiered_classes(load_trusted_pickle(labels_path), labels_path)
        npz = Path(src) / f"{split}_images.npz"
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as f:
                images: Sequence[Any] = f["images"]
        else:
            images = load_trusted_pickle(Path(src) / f"{split}_images_png.pkl")
        if len(images) != len(classes):
            raise ValueError(f"tieredImageNet {split}: {len(images)} images but {len(classes)} labels.")
        counts[split] = write_split(out, split, images, classes)
    return counts
