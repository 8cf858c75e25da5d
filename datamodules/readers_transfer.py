"""VTAB-1k, FGVC and the 10-dataset HTA benchmark, in their usual layouts.

* VTAB-1k, exported image folders + list files (the NOAH "Format B" most PEFT papers ship):
  `<root>/<task>/{train800,val200,train800val200,test}.txt`, lines `images/<split>/<n>.jpg <label>`.
  Hyper-parameters are tuned on train800 -> val200; final runs train on train800val200.
* FGVC (VPT's split JSONs): `<root>/{train,val,test}.json`, each `{relpath: class id}`. Class ids are
  mapped to 0..K-1 once, over all splits (VPT remaps per split, which shifts NABirds' val labels).
* HTA (the released `_DATA_DIR_CATALOG` of the HTA benchmark code, under one base folder): four FGVC sets, DTD partition 1,
  Food-101 / GTSRB (train pool shuffled with a stored seed, then 80/20), and CIFAR-10/100 / SVHN
  (first 80 % / last 20 % of the official train set). CIFAR and SVHN ship as pickles / .mat
  files; `prepare` exports them once to PNG folders + list files, which the reader then reads.
"""

from __future__ import annotations

import csv
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np

from vlm.datamodules.dataset_specs import (
    DatasetSpec,
    Split,
    class_folders,
    datum,
    list_images,
    register_dataset,
    require_dir,
    require_file,
)
from vlm.datamodules.downloads import TorchvisionDownload
from vlm.datamodules.readers_coop import prepare_download_only

HTA_SPLIT_SEED = 3407  # the HTA benchmark code's default seed, used here for the Food-101 / GTSRB 80/20 shuffles
VTAB_LISTS = {"train": "train800", "val": "val200", "train800val200": "train800val200", "test": "test"}
VTAB_TASKS: dict[str, int] = {
    "caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}


def read_optional_classnames(path: Path, count: int) -> list[str]:
    """`classnames.txt` (one name per line, label order) if present, else "class_<k>"."""
    if path.is_file():
        names = [n.strip() for n in path.read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(names) >= count:
            return names
    return [f"class_{k}" for k in range(count)]


def _read_list(spec: DatasetSpec, root: Path, folder: Path, name: str, names: list[str]) -> list:
    items = []
    for n, line in enumerate(require_file(spec, root, str((folder / name).relative_to(root))).read_text().splitlines()):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or not 0 <= int(parts[1]) < len(names):
            raise spec.layout_error(root, f"line {n + 1} of '{folder / name}' is {line!r}; expected '<relpath> <label 0..{len(names) - 1}>'.")
        items.append(datum(folder, parts[0], int(parts[1]), names[int(parts[1])]))
    return items


# ----------------------------------------------------------------------------- VTAB-1k
def read_vtab(root: Path, spec: DatasetSpec) -> Split:
    """One VTAB-1k task folder of the exported-images layout."""
    task = require_dir(spec, root, str(spec.options["task"]))
    names = read_optional_classnames(task / "classnames.txt", int(spec.options["num_classes"]))  # type: ignore[arg-type]
    return {key: _read_list(spec, root, task, f"{stem}.txt", names) for key, stem in VTAB_LISTS.items()}


for _task, _k in VTAB_TASKS.items():
    register_dataset(
        DatasetSpec(
            name=f"vtab_{_task}",
            family="vtab",
            reader=read_vtab,
            layout=(
                f"  <root>/{_task}/train800.txt, val200.txt, train800val200.txt, test.txt "
                "(lines '<relpath> <label>')\n"
                f"  <root>/{_task}/images/<split>/<n>.jpg; optional <root>/{_task}/classnames.txt"
            ),
            options={"task": _task, "num_classes": _k},
        )
    )


# ----------------------------------------------------------------------------- FGVC (VPT JSON)
def _fgvc_classname(dataset: str, relpath: str, class_id: int) -> str:
    """Class name from the image folder where the layout encodes it (CUB, Dogs); else a placeholder."""
    folder = relpath.split("/")[0]
    if dataset == "cub" and "." in folder:
        return folder.split(".", 1)[1].replace("_", " ")
    if dataset == "stanford_dogs" and "-" in folder:
        return folder.split("-", 1)[1].replace("_", " ")
    return f"class_{class_id}"


def read_vpt_json(root: Path, spec: DatasetSpec) -> Split:
    """`{train,val,test}.json` ({relpath: class id}) beside the image folder; one id map for all splits."""
    base = require_dir(spec, root, str(spec.options.get("subdir", ".")))
    raw: dict[str, dict[str, int]] = {}
    for key in ("train", "val", "test"):
        path = require_file(spec, base, f"{key}.json")
        try:
            data = json.loads(path.read_text())
            raw[key] = {str(rel): int(cid) for rel, cid in data.items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise spec.layout_error(root, f"'{path}' is not a JSON object {{relpath: class id}} ({e}).") from e
    image_root = _vpt_image_root(spec, root, base, next(iter(raw["train"]), ""))
    ids = sorted({cid for split in raw.values() for cid in split.values()})
    index = {cid: i for i, cid in enumerate(ids)}
    names_file = base / "classnames.txt"
    given = read_optional_classnames(names_file, len(ids)) if names_file.is_file() else None
    dataset = str(spec.options["kind"])
    names: dict[int, str] = {}
    for split in raw.values():
        for rel, cid in split.items():
            names.setdefault(cid, given[index[cid]] if given else _fgvc_classname(dataset, rel, cid))
    return {
        key: [datum(image_root, rel, index[cid], names[cid]) for rel, cid in sorted(split.items())]
        for key, split in raw.items()
    }


def _vpt_image_root(spec: DatasetSpec, root: Path, base: Path, first_rel: str) -> Path:
    """The image folder: `options["image_dir"]`, or torchvision's folder (`alt_image_dir`) when the images are there."""
    alt = spec.options.get("alt_image_dir")
    if alt is not None and first_rel and (base / str(alt)).is_dir():
        primary = base / str(spec.options["image_dir"])
        if not (primary / first_rel).is_file() and (base / str(alt) / first_rel).is_file():
            return base / str(alt)
    return require_dir(spec, base, str(spec.options["image_dir"]))


_FGVC = {  # name: (image folder under the dataset root, kind, HTA sub-folder or None)
    "cub": ("images", "cub", "CUB_200_2011"),
    "nabirds": ("images", "nabirds", "nabirds"),
    "fgvc_flowers": (".", "flowers", "102flowers"),
    "fgvc_cars": (".", "cars", None),
    "stanford_dogs": ("Images", "stanford_dogs", "stanford_dogs"),
}
_HTA_NAMES = {"cub": "hta_cub", "nabirds": "hta_nabirds", "fgvc_flowers": "hta_flowers", "stanford_dogs": "hta_stanford_dogs"}

for _name, (_img, _kind, _hta) in _FGVC.items():
    _flowers = _kind == "flowers"  # torchvision's Flowers102 fetches the images (not the VPT JSONs)
    _layout = (
        "  {base}{{train,val,test}}.json   (VPT split files: {{relpath: class id}}); optional classnames.txt\n"
        f"  images at {{base}}{'' if _img == '.' else _img + '/'}<relpath>"
        + (" or {base}flowers-102/<relpath> (torchvision Flowers102)" if _flowers else "")
    )
    _options = {"image_dir": _img, "kind": _kind, **({"alt_image_dir": "flowers-102"} if _flowers else {})}
    register_dataset(
        DatasetSpec(
            name=_name, family="fgvc", reader=read_vpt_json, layout=_layout.format(base="<root>/"), options=_options,
            prepare=prepare_download_only if _flowers else None,
            download=TorchvisionDownload("Flowers102") if _flowers else None,
        )
    )
    if _hta:
        register_dataset(
            DatasetSpec(
                name=_HTA_NAMES[_name], family="hta", reader=read_vpt_json, layout=_layout.format(base=f"<root>/{_hta}/"),
                options={**_options, "subdir": _hta},
                prepare=prepare_download_only if _flowers else None,
                download=TorchvisionDownload("Flowers102", _hta) if _flowers else None,
            )
        )


# ----------------------------------------------------------------------------- HTA: shuffled 80/20 helpers
def head_tail_split(items: list, fraction: float = 0.8, seed: int | None = None) -> tuple[list, list]:
    """First `fraction` / the rest of `items`, after a seeded shuffle when `seed` is given (the HTA code's 80/20)."""
    items = list(items)
    if seed is not None:
        random.Random(seed).shuffle(items)
    cut = int(len(items) * fraction)
    return items[:cut], items[cut:]


def read_hta_dtd(root: Path, spec: DatasetSpec) -> Split:
    """DTD partition 1: `DTD/dtd/dtd/labels/{train,val,test}1.txt` over `images/<class>/<file>`."""
    base = require_dir(spec, root, "DTD/dtd/dtd")
    image_root = require_dir(spec, base, "images")
    classes = class_folders(image_root)
    label = {c: i for i, c in enumerate(classes)}
    split: Split = {}
    for key in ("train", "val", "test"):
        rels = [r.strip() for r in require_file(spec, base, f"labels/{key}1.txt").read_text().splitlines() if r.strip()]
        split[key] = [datum(image_root, r, label[r.split("/")[0]], r.split("/")[0].replace("_", " ")) for r in rels]
    return split


def read_hta_food101(root: Path, spec: DatasetSpec) -> Split:
    """Food-101 `meta/{train,test}.json` ({class: ["class/id", ...]}); train pool shuffled, then 80/20."""
    base = require_dir(spec, root, "Food101/food-101")
    image_root = require_dir(spec, base, "images")
    metas = {k: json.loads(require_file(spec, base, f"meta/{k}.json").read_text()) for k in ("train", "test")}
    classes = sorted(metas["train"])
    label = {c: i for i, c in enumerate(classes)}

    def items(meta: dict[str, list[str]]) -> list:
        return [datum(image_root, f"{r}.jpg", label[c], c.replace("_", " ")) for c in classes for r in meta.get(c, [])]

    train, val = head_tail_split(items(metas["train"]), seed=int(spec.options["seed"]))  # type: ignore[arg-type]
    return {"train": train, "val": val, "test": items(metas["test"])}


def read_hta_gtsrb(root: Path, spec: DatasetSpec) -> Split:
    """torchvision's GTSRB layout under `GTSRB/`: Training/<class>/*.ppm, Final_Test/Images + GT-final_test.csv."""
    base = require_dir(spec, root, "GTSRB/gtsrb")
    train_root = require_dir(spec, base, "GTSRB/Training")
    classes = class_folders(train_root)
    pool = [datum(train_root, f"{c}/{p.name}", i, f"class_{i}") for i, c in enumerate(classes) for p in list_images(train_root / c)]
    train, val = head_tail_split(pool, seed=int(spec.options["seed"]))  # type: ignore[arg-type]
    test_root = require_dir(spec, base, "GTSRB/Final_Test/Images")
    with require_file(spec, base, "GT-final_test.csv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    test = [datum(test_root, r["Filename"], int(r["ClassId"]), f"class_{int(r['ClassId'])}") for r in rows]
    return {"train": train, "val": val, "test": test}


# ----------------------------------------------------------------------------- HTA: exported pickles
EXPORT_DIR = "vlm_export"


def read_exported(root: Path, spec: DatasetSpec) -> Split:
    """PNG exports written by `prepare` (`<sub>/vlm_export/{train,test}.txt` + classnames.txt); 80/20 head/tail."""
    folder = root / str(spec.options["subdir"]) / EXPORT_DIR
    if not (folder / "train.txt").is_file():
        raise spec.layout_error(root, f"'{folder}' has not been exported yet (raw files stay as shipped; the export is PNGs).")
    names = read_optional_classnames(folder / "classnames.txt", int(spec.options["num_classes"]))  # type: ignore[arg-type]
    train, val = head_tail_split(_read_list(spec, root, folder, "train.txt", names))
    return {"train": train, "val": val, "test": _read_list(spec, root, folder, "test.txt", names)}


def _load_pickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_arrays(sub: Path, kind: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Images [N, 32, 32, 3] and labels per split from the python-pickle CIFAR release."""
    if kind == "cifar10":
        folder = sub / "cifar-10-batches-py"
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        names, key = _load_pickle(folder / "batches.meta")["label_names"], "labels"
    else:
        folder = sub / "cifar-100-python"
        parts = {"train": ["train"], "test": ["test"]}
        names, key = _load_pickle(folder / "meta")["fine_label_names"], "fine_labels"
    out = {}
    for split, files in parts.items():
        batches = [_load_pickle(folder / f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        out[split] = (data.transpose(0, 2, 3, 1), np.concatenate([np.asarray(b[key]) for b in batches]))
    return out, [n.replace("_", " ") for n in names]


def _svhn_arrays(sub: Path, kind: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    from scipy.io import loadmat

    out = {}
    for split in ("train", "test"):
        mat = loadmat(str(sub / f"{split}_32x32.mat"))
        labels = mat["y"].astype(np.int64).squeeze(-1)
        labels[labels == 10] = 0  # as torchvision: the digit 0 is stored as 10
        out[split] = (mat["X"].transpose(3, 0, 1, 2), labels)
    return out, [str(d) for d in range(10)]


_ARRAY_LOADERS = {"cifar10": _cifar_arrays, "cifar100": _cifar_arrays, "svhn": _svhn_arrays}


def prepare_export(root: Path, spec: DatasetSpec, download: bool) -> list[Path]:
    """Download (optionally) with torchvision, then write `<sub>/vlm_export/<split>/<n>.png` + list files."""
    from PIL import Image

    sub = root / str(spec.options["subdir"])
    if download and spec.download is not None:
        spec.download(root)
    out = sub / EXPORT_DIR
    if (out / "train.txt").is_file() and (out / "test.txt").is_file():
        return []
    try:
        arrays, names = _ARRAY_LOADERS[str(spec.options["kind"])](sub, str(spec.options["kind"]))
    except (FileNotFoundError, KeyError) as e:
        raise spec.layout_error(root, f"cannot read the raw files under '{sub}' ({e}).") from e
    written = []
    for split, (images, labels) in arrays.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for n, (img, y) in enumerate(zip(images, labels)):
            rel = f"{split}/{n:06d}.png"
            Image.fromarray(img).save(out / rel)
            lines.append(f"{rel} {int(y)}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
        written.append(out / f"{split}.txt")
    (out / "classnames.txt").write_text("\n".join(names) + "\n")
    return written


_HTA_EXPORTED = {  # name: (sub-folder, kind, classes, torchvision class, raw layout)
    "hta_cifar10": ("Cifar10", "cifar10", 10, "CIFAR10", "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    "hta_cifar100": ("Cifar100", "cifar100", 100, "CIFAR100", "cifar-100-python/{train,test,meta}"),
    "hta_svhn": ("SVHN", "svhn", 10, "SVHN", "{train,test}_32x32.mat"),
}
for _name, (_sub, _kind, _k, _tv, _raw) in _HTA_EXPORTED.items():
    register_dataset(
        DatasetSpec(
            name=_name, family="hta", reader=read_exported,
            layout=f"  <root>/{_sub}/{_raw}   (torchvision's files)\n  <root>/{_sub}/{EXPORT_DIR}/  (PNG export written by prepare)",
            options={"subdir": _sub, "kind": _kind, "num_classes": _k},
            prepare=prepare_export,
            download=TorchvisionDownload(_tv, _sub, ({"split": "train"}, {"split": "test"}) if _tv == "SVHN" else ({},)),
        )
    )

register_dataset(DatasetSpec(
    name="hta_dtd", family="hta", reader=read_hta_dtd, template="{} texture.",
    layout="  <root>/DTD/dtd/dtd/images/<class>/*.jpg, <root>/DTD/dtd/dtd/labels/{train,val,test}1.txt",
    prepare=prepare_download_only, download=TorchvisionDownload("DTD", "DTD"),
))
register_dataset(DatasetSpec(
    name="hta_food101", family="hta", reader=read_hta_food101, template="a photo of {}, a type of food.",
    layout="  <root>/Food101/food-101/images/<class>/<id>.jpg, <root>/Food101/food-101/meta/{train,test}.json",
    options={"seed": HTA_SPLIT_SEED},
    prepare=prepare_download_only, download=TorchvisionDownload("Food101", "Food101"),
))
register_dataset(DatasetSpec(
    name="hta_gtsrb", family="hta", reader=read_hta_gtsrb,
    layout=(
        "  <root>/GTSRB/gtsrb/GTSRB/Training/<class 00000..>/*.ppm, <root>/GTSRB/gtsrb/GTSRB/Final_Test/Images/*.ppm,\n"
        "  <root>/GTSRB/gtsrb/GT-final_test.csv   (torchvision GTSRB(root=<root>/GTSRB) layout)"
    ),
    options={"seed": HTA_SPLIT_SEED},
    prepare=prepare_download_only, download=TorchvisionDownload("GTSRB", "GTSRB", ({"split": "train"}, {"split": "test"})),
))
