"""The 11 CoOp prompt-learning datasets and the ImageNet OOD variants, in their standard layouts.

Split-file datasets read `<root>/split_zhou_<Name>.json` (CoOp's files) with images under the
CoOp folder or, as an alternative, the folder torchvision downloads into:
the same relative paths start from either. FGVCAircraft reads the official variant lists;
ImageNet and its variants read class folders plus CoOp's `classnames.txt`. For datasets whose
CoOp split was made from class folders (Caltech101, DTD, EuroSAT, Food101, UCF101), `prepare`
writes a seeded 50/20/30 split file when none is present (CoOp's `read_and_split_data`
procedure; the published CoOp files are preferred for comparable numbers).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from vlm.datamodules.dataset_specs import (
    DatasetSpec,
    Split,
    class_folders,
    datum,
    first_existing_dir,
    get_dataset,
    list_images,
    read_wnid_classnames,
    register_dataset,
    require_dir,
    require_file,
)
from vlm.datamodules.downloads import TorchvisionDownload
from vlm.datamodules.splits import read_split
from vlm.datamodules.templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT

IMAGENET_ENSEMBLES = {"imagenet80": IMAGENET_TEMPLATES, "imagenet7": IMAGENET_TEMPLATES_SELECT}
GENERATED_SPLIT_SEED = 1


# ----------------------------------------------------------------------------- split-file datasets
def read_coop_split(root: Path, spec: DatasetSpec) -> Split:
    """`split_zhou_<Name>.json` over the first existing image folder among `options["image_dirs"]`."""
    split_file = root / f"split_zhou_{spec.options['split_name']}.json"
    if not split_file.is_file():
        raise spec.layout_error(root, f"missing split file '{split_file}'.")
    image_root = first_existing_dir(spec, root, spec.options["image_dirs"])  # type: ignore[arg-type]
    try:
        return read_split(split_file, image_root, required=("train", "val", "test"))
    except ValueError as e:
        raise spec.layout_error(root, f"malformed split file: {e}") from e


def _class_folder_split(root: Path, spec: DatasetSpec, seed: int = GENERATED_SPLIT_SEED) -> dict[str, list[list[Any]]]:
    """CoOp's `read_and_split_data(p_trn=0.5, p_val=0.2)`: a per-class random 50/20/30 split."""
    image_root = first_existing_dir(spec, root, spec.options["image_dirs"])  # type: ignore[arg-type]
    ignore = spec.options.get("ignore", ())
    renames: dict[str, str] = dict(spec.options.get("renames", {}))  # type: ignore[arg-type]
    rng = random.Random(seed)
    out: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for label, folder in enumerate(class_folders(image_root, ignore)):  # type: ignore[arg-type]
        images = [f"{folder}/{p.name}" for p in list_images(image_root / folder)]
        rng.shuffle(images)
        n_train, n_val = round(len(images) * 0.5), round(len(images) * 0.2)
        if len(images) < 3 or n_train == 0 or len(images) - n_train - n_val <= 0:
            raise spec.layout_error(root, f"class folder '{image_root / folder}' has {len(images)} images; need >= 3.")
        name = renames.get(folder, folder)
        for key, chunk in (
            ("train", images[:n_train]),
            ("val", images[n_train : n_train + n_val]),
            ("test", images[n_train + n_val :]),
        ):
            out[key].extend([rel, label, name] for rel in chunk)
    return out


def prepare_class_folder_split(root: Path, spec: DatasetSpec, download: bool) -> list[Path]:
    """Download (optionally), then write `split_zhou_<Name>.json` from class folders if it is missing."""
    if download and spec.download is not None:
        spec.download(root)
    path = root / f"split_zhou_{spec.options['split_name']}.json"
    if path.is_file():
        return []
    path.write_text(json.dumps(_class_folder_split(root, spec)))
    return [path]


def prepare_download_only(root: Path, spec: DatasetSpec, download: bool) -> list[Path]:
    """Download (optionally); the split file itself must come from CoOp's DATASETS.md."""
    if download and spec.download is not None:
        spec.download(root)
    return []


def _split_layout(split_name: str, image_dirs: tuple[str, ...], extra: str = "") -> str:
    alts = " or ".join(f"<root>/{d}/" if d not in ("", ".") else "<root>/" for d in image_dirs)
    return (
        f"  <root>/split_zhou_{split_name}.json   (CoOp split: {{train,val,test}}: [[relpath, label, classname]])\n"
        f"  images at {alts}<relpath>{extra}"
    )


_COOP_SPLIT_DATASETS: dict[str, dict[str, Any]] = {
    # name: split file name, image folders (CoOp first, then torchvision), torchvision class, class-folder split?
    "caltech101": dict(
        split_name="Caltech101", image_dirs=("101_ObjectCategories", "caltech101/101_ObjectCategories"),
        tv=("Caltech101", {}), folders=True, ignore=("BACKGROUND_Google", "Faces_easy"),
        renames={"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"},
    ),
    "oxford_pets": dict(split_name="OxfordPets", image_dirs=("images", "oxford-iiit-pet/images"), tv=("OxfordIIITPet", {})),
    "stanford_cars": dict(split_name="StanfordCars", image_dirs=(".", "stanford_cars"), tv=None),
    "oxford_flowers": dict(split_name="OxfordFlowers", image_dirs=("jpg", "flowers-102/jpg"), tv=("Flowers102", {})),
    "food101": dict(split_name="Food101", image_dirs=("images", "food-101/images"), tv=("Food101", {}), folders=True),
    "sun397": dict(split_name="SUN397", image_dirs=("SUN397",), tv=("SUN397", {})),
    "dtd": dict(split_name="DescribableTextures", image_dirs=("images", "dtd/dtd/images"), tv=("DTD", {}), folders=True),
    "eurosat": dict(
        split_name="EuroSAT", image_dirs=("2750", "eurosat/2750"), tv=("EuroSAT", {}), folders=True,
        renames={
            "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
            "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
            "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
            "SeaLake": "Sea or Lake",
        },
    ),
    "ucf101": dict(split_name="UCF101", image_dirs=("UCF-101-midframes",), tv=None, folders=True),
}

for _name, _o in _COOP_SPLIT_DATASETS.items():
    _tv = _o.pop("tv")
    _folders = _o.pop("folders", False)
    register_dataset(
        DatasetSpec(
            name=_name,
            family="coop",
            reader=read_coop_split,
            layout=_split_layout(_o["split_name"], _o["image_dirs"]),
            template=CUSTOM_TEMPLATES[_o["split_name"]],
            options=_o,
            prepare=prepare_class_folder_split if _folders else prepare_download_only,
            download=TorchvisionDownload(_tv[0], calls=(_tv[1],)) if _tv else None,
        )
    )


# ----------------------------------------------------------------------------- FGVCAircraft
def read_fgvc_aircraft(root: Path, spec: DatasetSpec) -> Split:
    """Official `images_variant_{train,val,test}.txt` (`<id> <variant>`) and `variants.txt` (label order)."""
    data = first_existing_dir(spec, root, (".", "fgvc-aircraft-2013b/data"))
    if not (data / "variants.txt").is_file():
        data = first_existing_dir(spec, root, ("fgvc-aircraft-2013b/data",))
    variants = [v.strip() for v in require_file(spec, data, "variants.txt").read_text().splitlines() if v.strip()]
    label = {v: i for i, v in enumerate(variants)}
    image_root = require_dir(spec, data, "images")
    split: Split = {}
    for key in ("train", "val", "test"):
        items = []
        for line in require_file(spec, data, f"images_variant_{key}.txt").read_text().splitlines():
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label:
                raise spec.layout_error(root, f"variant {variant!r} of image {image_id} is not in variants.txt.")
            items.append(datum(image_root, f"{image_id}.jpg", label[variant], variant))
        split[key] = items
    return split


register_dataset(
    DatasetSpec(
        name="fgvc_aircraft",
        family="coop",
        reader=read_fgvc_aircraft,
        layout=(
            "  <root>/images/<id>.jpg, <root>/variants.txt, <root>/images_variant_{train,val,test}.txt\n"
            "  (CoOp: fgvc-aircraft-2013b/data renamed to fgvc_aircraft; or torchvision's <root>/fgvc-aircraft-2013b/data/)"
        ),
        template=CUSTOM_TEMPLATES["FGVCAircraft"],
        prepare=prepare_download_only,
        download=TorchvisionDownload("FGVCAircraft", calls=({"annotation_level": "variant"},)),
    )
)


# ----------------------------------------------------------------------------- ImageNet and OOD variants
def _wnid_names(spec: DatasetSpec, root: Path) -> dict[str, str]:
    return read_wnid_classnames(require_file(spec, root, "classnames.txt"))


def _wnid_folder_items(spec: DatasetSpec, root: Path, folder: Path, wnids: list[str], names: dict[str, str]) -> list:
    items = []
    for label, wnid in enumerate(wnids):
        if wnid not in names:
            raise spec.layout_error(root, f"class folder '{wnid}' is not listed in classnames.txt.")
        items += [datum(folder, f"{wnid}/{p.name}", label, names[wnid]) for p in list_images(folder / wnid)]
    return items


def read_imagenet(root: Path, spec: DatasetSpec) -> Split:
    """`images/{train,val}/<wnid>/` (CoOp) or `{train,val}/<wnid>/` (torchvision); val is the test set."""
    base = first_existing_dir(spec, root, ("images", "."))
    train_dir, val_dir = require_dir(spec, base, "train"), require_dir(spec, base, "val")
    names = _wnid_names(spec, root)
    wnids = class_folders(train_dir)
    return {
        "train": _wnid_folder_items(spec, root, train_dir, wnids, names),
        "val": [],
        "test": _wnid_folder_items(spec, root, val_dir, wnids, names),
    }


def read_imagenet_folder_variant(root: Path, spec: DatasetSpec) -> Split:
    """Sketch / A / R: `<image_dir>/<wnid>/`, labels by sorted wnid (A and R: their own 200 classes)."""
    folder = require_dir(spec, root, str(spec.options["image_dir"]))
    names = _wnid_names(spec, root)
    return {"test": _wnid_folder_items(spec, root, folder, class_folders(folder), names)}


def read_imagenetv2(root: Path, spec: DatasetSpec) -> Split:
    """`imagenetv2-matched-frequency-format-val/<label>/`, class name = the label-th line of classnames.txt."""
    folder = require_dir(spec, root, "imagenetv2-matched-frequency-format-val")
    names = list(_wnid_names(spec, root).values())
    items = []
    for label, classname in enumerate(names):
        sub = folder / str(label)
        if sub.is_dir():
            items += [datum(folder, f"{label}/{p.name}", label, classname) for p in list_images(sub)]
    return {"test": items}


def imagenet_subset_indices(root: str | Path, name: str) -> list[int]:
    """For fixed 1000-way heads: the ImageNet index of each class of a 200-class variant (A or R), in label order.

    The index is the wnid's position in the sorted 1000 wnids of `classnames.txt` (Hendrycks' mapping).
    """
    spec = get_dataset(name)
    root = Path(root)
    all_wnids = sorted(_wnid_names(spec, root))
    pos = {w: i for i, w in enumerate(all_wnids)}
    return [pos[w] for w in class_folders(require_dir(spec, root, str(spec.options["image_dir"])))]


_CLASSNAMES_TXT = "  <root>/classnames.txt   (CoOp's file: '<wnid> <class name>' per line, sorted wnids)\n"
register_dataset(
    DatasetSpec(
        name="imagenet",
        family="coop",
        reader=read_imagenet,
        layout=_CLASSNAMES_TXT + "  <root>/images/train/<wnid>/*.JPEG, <root>/images/val/<wnid>/*.JPEG (val in class folders)",
        template=CUSTOM_TEMPLATES["ImageNet"],
        ensembles=IMAGENET_ENSEMBLES,
    )
)
register_dataset(
    DatasetSpec(
        name="imagenetv2",
        family="imagenet_ood",
        reader=read_imagenetv2,
        layout=_CLASSNAMES_TXT + "  <root>/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg",
        template=CUSTOM_TEMPLATES["ImageNetV2"],
        ensembles=IMAGENET_ENSEMBLES,
        test_only=True,
    )
)
for _name, _dir, _tpl in (
    ("imagenet_sketch", "images", "ImageNetSketch"),
    ("imagenet_a", "imagenet-a", "ImageNetA"),
    ("imagenet_r", "imagenet-r", "ImageNetR"),
):
    register_dataset(
        DatasetSpec(
            name=_name,
            family="imagenet_ood",
            reader=read_imagenet_folder_variant,
            layout=_CLASSNAMES_TXT + f"  <root>/{_dir}/<wnid>/*   (labels = sorted wnid folders)",
            template=CUSTOM_TEMPLATES[_tpl],
            ensembles=IMAGENET_ENSEMBLES,
            options={"image_dir": _dir},
            test_only=True,
        )
    )
