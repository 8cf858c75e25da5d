"""Tiny generated datasets in each supported on-disk layout (a few 8x8 images per class).

`write_layout(name, root)` writes the layout the registry entry `name` reads and returns what a
correct reader must find: `Expected(counts={split: n}, num_classes, classnames)`.
"""

from __future__ import annotations

import csv
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.datamodules import get_dataset
from vlm.datamodules.readers_transfer import VTAB_TASKS

PER_SPLIT = {"train": 3, "val": 2, "test": 2}  # images per class and split
_counter = [0]


@dataclass
class Expected:
    counts: dict[str, int]
    num_classes: int
    classnames: list[str]


def img(path: Path, size: int = 8) -> None:
    """A small random image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _counter[0] += 1
    arr = np.random.default_rng(_counter[0]).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _counts(n_cls: int, per: dict[str, int] = PER_SPLIT) -> dict[str, int]:
    return {k: v * n_cls for k, v in per.items()}


# ----------------------------------------------------------------------------- CoOp split files
def coop_split(name: str, root: Path, image_dir: str | None = None) -> Expected:
    spec = get_dataset(name)
    image_dir = image_dir if image_dir is not None else spec.options["image_dirs"][0]
    base = root / image_dir if image_dir not in ("", ".") else root
    classes = ["alpha_one", "beta", "gamma"]
    split = {}
    for key, per in PER_SPLIT.items():
        split[key] = []
        for label, c in enumerate(classes):
            for i in range(per):
                rel = f"{c}/{key}_{i}.jpg"
                img(base / rel)
                split[key].append([rel, label, c])
    (root / f"split_zhou_{spec.options['split_name']}.json").write_text(json.dumps(split))
    return Expected(_counts(3), 3, classes)


def class_folders(name: str, root: Path, per_class: int = 10) -> list[str]:
    """Raw class folders (no split file) for the datasets whose split `prepare` generates."""
    spec = get_dataset(name)
    base = root / spec.options["image_dirs"][0]
    folders = ["Faces", "airplanes", "BACKGROUND_Google"] if name == "caltech101" else ["AnnualCrop", "SeaLake", "River"]
    for f in folders:
        for i in range(per_class):
            img(base / f / f"{i:04d}.jpg")
    return folders


def fgvc_aircraft(name: str, root: Path) -> Expected:
    variants = ["707-320", "A300B4", "Cessna 172"]
    (root / "variants.txt").write_text("\n".join(variants) + "\n")
    for key, per in PER_SPLIT.items():
        lines = []
        for v in variants:
            for i in range(per):
                image_id = f"{abs(hash((key, v, i))) % 10**7:07d}"
                img(root / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {v}")
        (root / f"images_variant_{key}.txt").write_text("\n".join(lines) + "\n")
    return Expected(_counts(3), 3, variants)


WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def _classnames_txt(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))


def imagenet(name: str, root: Path) -> Expected:
    _classnames_txt(root)
    for split, per in (("train", 3), ("val", 2)):
        for w in WNIDS:
            for i in range(per):
                img(root / "images" / split / w / f"{w}_{i}.JPEG")
    return Expected({"train": 9, "val": 0, "test": 6}, 3, NAMES)


def imagenet_variant(name: str, root: Path) -> Expected:
    _classnames_txt(root)
    if name == "imagenetv2":
        for label in range(3):
            for i in range(2):
                img(root / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg")
        return Expected({"test": 6}, 3, NAMES)
    folder = root / get_dataset(name).options["image_dir"]
    used = WNIDS[1:]  # A and R hold a subset of the 1000 classes, relabelled from 0
    for w in used:
        for i in range(2):
            img(folder / w / f"{i}.jpg")
    if name != "imagenet_sketch":
        (folder / "README.txt").write_text("not a class")
    return Expected({"test": 4}, 2, NAMES[1:])


# ----------------------------------------------------------------------------- VTAB / FGVC / HTA
def vtab(name: str, root: Path) -> Expected:
    task = get_dataset(name).options["task"]
    k = VTAB_TASKS[task]
    labels = [0, 1, k - 1]  # a sparse label set: classes missing from a small split keep their labels
    stems = {"train800": 3, "val200": 2, "test": 2}
    lists: dict[str, list[str]] = {}
    for stem, per in stems.items():
        sub = "test" if stem == "test" else ("val" if stem == "val200" else "train")
        lists[stem] = []
        for y in labels:
            for i in range(per):
                rel = f"images/{sub}/{y:03d}{i:03d}.jpg"
                img(root / task / rel)
                lists[stem].append(f"{rel} {y}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for stem, lines in lists.items():
        (root / task / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return Expected({"train": 9, "val": 6, "test": 6, "train800val200": 15}, k, [f"class_{i}" for i in range(k)])


_FGVC_FOLDERS = {
    "cub": ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"],
    "stanford_dogs": ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"],
}


def vpt_json(name: str, root: Path) -> Expected:
    spec = get_dataset(name)
    base = root / spec.options.get("subdir", ".")
    kind = spec.options["kind"]
    folders = _FGVC_FOLDERS.get(kind, ["0817", "0818", "0900"])
    ids = [1, 2, 3] if kind != "nabirds" else [817, 818, 900]
    image_root = base / spec.options["image_dir"] if spec.options["image_dir"] != "." else base
    for key, per in PER_SPLIT.items():
        mapping = {}
        for f, cid in zip(folders, ids):
            for i in range(per):
                rel = f"{f}/{key}_{i}.jpg"
                img(image_root / rel)
                mapping[rel] = f"{cid:03d}" if kind == "cub" else cid
        if key == "val" and kind == "nabirds":  # NABirds' val lacks classes: the id map must still be global
            mapping = {r: c for r, c in mapping.items() if c != 818}
        (base / f"{key}.json").write_text(json.dumps(mapping))
    if kind == "cub":
        names = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    elif kind == "stanford_dogs":
        names = ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    else:
        names = [f"class_{i}" for i in ids]
    counts = _counts(3)
    if kind == "nabirds":
        counts["val"] = 4
    return Expected(counts, 3, names)


def hta_dtd(name: str, root: Path) -> Expected:
    base = root / "DTD/dtd/dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    for key, per in PER_SPLIT.items():
        rels = []
        for c in classes:
            for i in range(per):
                rels.append(f"{c}/{c}_{key}{i}.jpg")
                img(base / "images" / rels[-1])
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{key}1.txt").write_text("\n".join(rels) + "\n")
    return Expected(_counts(3), 3, classes)


def hta_food101(name: str, root: Path) -> Expected:
    base = root / "Food101/food-101"
    classes = ["apple_pie", "baby_back_ribs", "sushi"]
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for key, per in (("train", 5), ("test", 2)):
        for c in classes:
            meta[key][c] = [f"{c}/{key}{i}" for i in range(per)]
            for r in meta[key][c]:
                img(base / "images" / f"{r}.jpg")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for key in meta:
        (base / "meta" / f"{key}.json").write_text(json.dumps(meta[key]))
    return Expected({"train": 12, "val": 3, "test": 6}, 3, ["apple pie", "baby back ribs", "sushi"])


def hta_gtsrb(name: str, root: Path) -> Expected:
    base = root / "GTSRB/gtsrb"
    for c in range(3):
        for i in range(5):
            img(base / "GTSRB/Training" / f"{c:05d}" / f"{i:05d}_00000.ppm")
    rows = []
    for n in range(6):
        img(base / "GTSRB/Final_Test/Images" / f"{n:05d}.ppm")
        rows.append({"Filename": f"{n:05d}.ppm", "Width": 8, "Height": 8, "ClassId": n % 3})
    with (base / "GT-final_test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Filename", "Width", "Height", "ClassId"], delimiter=";")
        w.writeheader()
        w.writerows(rows)
    return Expected({"train": 12, "val": 3, "test": 6}, 3, [f"class_{i}" for i in range(3)])


def hta_exported(name: str, root: Path) -> Expected:
    """Raw torchvision-format files (CIFAR pickles, SVHN .mat) that `prepare` exports to PNGs."""
    spec = get_dataset(name)
    sub = root / spec.options["subdir"]
    rng = np.random.default_rng(0)
    n_train, n_test = 10, 4
    if spec.options["kind"] == "svhn":
        from scipy.io import savemat

        sub.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
            y = (np.arange(n) % 3 + 9).reshape(-1, 1)  # labels 9, 10 (= digit 0), 11 -> kept as given except 10
            y[y == 11] = 1
            savemat(str(sub / f"{split}_32x32.mat"), {"X": x, "y": y})
        return Expected({"train": 8, "val": 2, "test": 4}, 10, [str(d) for d in range(10)])
    cifar10 = spec.options["kind"] == "cifar10"
    folder = sub / ("cifar-10-batches-py" if cifar10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = "labels" if cifar10 else "fine_labels"
    k = 10 if cifar10 else 100
    names = [f"name_{i}" for i in range(k)]

    def dump(fname: str, n: int) -> None:
        with (folder / fname).open("wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % 3)}, f)

    if cifar10:
        for i in range(1, 6):
            dump(f"data_batch_{i}", 2)
        dump("test_batch", n_test)
        meta = ("batches.meta", {"label_names": names})
    else:
        dump("train", n_train)
        dump("test", n_test)
        meta = ("meta", {"fine_label_names": names})
    with (folder / meta[0]).open("wb") as f:
        pickle.dump(meta[1], f)
    return Expected({"train": 8, "val": 2, "test": 4}, k, [n.replace("_", " ") for n in names])


# ----------------------------------------------------------------------------- episodic
def episodic(name: str, root: Path) -> Expected:
    label_classes = {"base": ["n01532829", "n01558993"], "val": ["n01704323"], "novel": ["n01749939", "n01770081"]}
    for folder, classes in label_classes.items():
        for c in classes:
            for i in range(4):
                img(root / folder / c / f"{c}{i:08d}.jpg")
    (root / "classnames.txt").write_text("n01532829 house finch\nn01558993 robin\n")
    return Expected({"train": 8, "val": 4, "test": 8}, 5, ["house finch", "robin", "n01704323", "n01749939", "n01770081"])


def _writer_for(name: str) -> Callable[[str, Path], Expected]:
    spec = get_dataset(name)
    special: dict[str, Callable[[str, Path], Expected]] = {
        "fgvc_aircraft": fgvc_aircraft, "imagenet": imagenet, "hta_dtd": hta_dtd, "hta_food101": hta_food101,
        "hta_gtsrb": hta_gtsrb, "hta_cifar10": hta_exported, "hta_cifar100": hta_exported, "hta_svhn": hta_exported,
    }
    if name in special:
        return special[name]
    by_family: dict[str, Callable[[str, Path], Expected]] = {
        "coop": coop_split, "imagenet_ood": imagenet_variant, "vtab": vtab, "fgvc": vpt_json, "hta": vpt_json,
        "episodic": episodic,
    }
    return by_family[spec.family]


def write_layout(name: str, root: Path) -> Expected:
    """Write a tiny `name` dataset under `root` in its standard layout (raw files for export-first sets)."""
    root.mkdir(parents=True, exist_ok=True)
    return _writer_for(name)(name, root)
