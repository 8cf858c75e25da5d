"""VTAB-1k from TensorFlow Datasets into the exported-folder layout the `vtab_*` registry entries read.

The split definitions follow google-research/task_adaptation (`task_adaptation/data/*.py`):
`train800` = the first 800 of the task's train part, `val200` = 200 examples from the start of
its validation part (the official validation split, or the tail carved off the TFDS train split
by the task's percentages), `test` = the task's test part, and derived labels for CLEVR, KITTI,
dSprites and smallNORB. Each task is written as

    <out>/<task>/images/{train800,val200,test}/<NNNNNN>.png
    <out>/<task>/{train800,val200,train800val200,test}.txt   lines "images/<split>/<NNNNNN>.png <label>"
    <out>/<task>/classnames.txt                              when TFDS names the classes

PNG keeps the decoded TFDS pixels exactly. `tensorflow_datasets` is needed only here and is
imported lazily (`load_tfds`); the converter itself takes any object with TFDS's `builder` /
`as_numpy` interface, which is what the tests pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm.datamodules.readers_transfer import VTAB_TASKS

Example = Mapping[str, Any]
LIST_STEMS = ("train800", "val200", "test")


@dataclass(frozen=True)
class Slice:
    """`split[start:stop]` of a TFDS split (stop None = to the end)."""

    split: str
    start: int = 0
    stop: int | None = None

    def spec(self) -> str:
        """The TFDS split string, e.g. "train[45000:45200]"."""
        return f"{self.split}[{self.start}:{'' if self.stop is None else self.stop}]"


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: its TFDS builder, how the splits are cut, and how an example becomes (image, label).

    Attributes:
        tfds_name: builder name with version pattern, as task_adaptation passes to `tfds.builder`.
        cut: "official" (train / validation / test splits), ("carve", p, test_split) (validation =
            the train split after its first p %), ("carve3", p, q) (train p %, validation q %, test the
            rest, all from the train split) or "smallnorb" (validation = first half of test).
        label: example -> integer label.
        grey: the image has one channel (tiled to RGB); `scale` multiplies the pixel values (dSprites: 0/1).
    """

    tfds_name: str
    cut: Any
    label: Callable[[Example], int]
    grey: bool = False
    scale: int = 1
    named: bool = True


def _label(ex: Example) -> int:
    return int(ex["label"])


def _threshold(value: float, thresholds: Iterable[float]) -> int:
    """task_adaptation's `reduce_max(where(thrs - value < 0))`: the last threshold below `value`."""
    return int(max(i for i, t in enumerate(thresholds) if t - value < 0))


def _clevr_count(ex: Example) -> int:
    return len(ex["objects"]["size"]) - 3


def _clevr_dist(ex: Example) -> int:
    dist = float(np.min(np.asarray(ex["objects"]["pixel_coords"])[:, 2]))
    return _threshold(dist, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))


def _kitti_vehicle(ex: Example) -> int:
    kinds = np.asarray(ex["objects"]["type"])
    z = np.asarray(ex["objects"]["location"]).reshape(-1, 3)[:, 2][kinds < 3]  # Car, Van, Truck
    return _threshold(float(np.min(np.concatenate([z, [1000.0]]))), (-100.0, 8.0, 20.0, 999.0))


def _binned(attr: str, original: int, classes: int = 16) -> Callable[[Example], int]:
    factor = original / classes
    return lambda ex: int(np.floor(float(ex[attr]) / factor))


def _attr(attr: str) -> Callable[[Example], int]:
    return lambda ex: int(ex[attr])


TASKS: dict[str, VtabTask] = {
    "caltech101": VtabTask("caltech101:3.*.*", ("carve", 90, "test"), _label),
    "cifar": VtabTask("cifar100:3.*.*", ("carve", 90, "test"), _label),
    "dtd": VtabTask("dtd:3.*.*", "official", _label),
    "oxford_flowers102": VtabTask("oxford_flowers102:2.*.*", "official", _label),
    "oxford_iiit_pet": VtabTask("oxford_iiit_pet:3.*.*", ("carve", 80, "test"), _label),
    "svhn": VtabTask("svhn_cropped:3.*.*", ("carve", 90, "test"), _label),
    "sun397": VtabTask("sun397/tfds:4.*.*", "official", _label),
    "patch_camelyon": VtabTask("patch_camelyon:2.*.*", "official", _label),
    "eurosat": VtabTask("eurosat/rgb:2.*.*", ("carve3", 60, 20), _label),
    "resisc45": VtabTask("resisc45:3.*.*", ("carve3", 60, 20), _label),
    "diabetic_retinopathy": VtabTask("diabetic_retinopathy_detection/btgraham-300:3.*.*", "official", _label),
    "clevr_count": VtabTask("clevr:3.*.*", ("carve", 90, "validation"), _clevr_count, named=False),
    "clevr_dist": VtabTask("clevr:3.*.*", ("carve", 90, "validation"), _clevr_dist, named=False),
    "dmlab": VtabTask("dmlab:2.0.1", "official", _label),
    "kitti": VtabTask("kitti:3.*.*", "official", _kitti_vehicle, named=False),
    "dsprites_loc": VtabTask("dsprites:2.*.*", ("carve3", 80, 10), _binned("label_x_position", 32), True, 255, False),
    "dsprites_ori": VtabTask("dsprites:2.*.*", ("carve3", 80, 10), _binned("label_orientation", 40), True, 255, False),
    "smallnorb_azi": VtabTask("smallnorb:2.*.*", "smallnorb", _attr("label_azimuth"), True, named=False),
    "smallnorb_ele": VtabTask("smallnorb:2.*.*", "smallnorb", _attr("label_elevation"), True, named=False),
}


def split_plan(task: VtabTask, counts: Mapping[str, int]) -> dict[str, Slice]:
    """The TFDS slices of train800 / val200 / test, from the TFDS split sizes `counts`."""
    train800 = Slice("train", 0, 800)
    if task.cut == "official":
        return {"train800": train800, "val200": Slice("validation", 0, 200), "test": Slice("test")}
    if task.cut == "smallnorb":
        return {"train800": train800, "val200": Slice("test", 0, 200), "test": Slice("test", counts["test"] * 50 // 100)}
    kind, p, extra = task.cut
    cut = p * counts["train"] // 100
    if kind == "carve":
        return {"train800": train800, "val200": Slice("train", cut, cut + 200), "test": Slice(str(extra))}
    val = int(extra) * counts["train"] // 100
    return {"train800": train800, "val200": Slice("train", cut, cut + 200), "test": Slice("train", cut + val)}


def _rgb(image: np.ndarray, task: VtabTask) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return (arr.astype(np.int64) * task.scale).clip(0, 255).astype(np.uint8)


def export_task(tfds: Any, name: str, out: str | Path, data_dir: str | None = None, prepare: bool = True) -> dict[str, int]:
    """Write one VTAB-1k task (registry suffix `name`, e.g. "cifar") under `out/name`; return counts per list."""
    from PIL import Image

    if name not in TASKS:
        raise KeyError(f"Unknown VTAB-1k task {name!r}. Tasks: {', '.join(TASKS)}.")
    task, num_classes = TASKS[name], VTAB_TASKS[name]
    builder = tfds.builder(task.tfds_name, data_dir=data_dir)
    if prepare:
        builder.download_and_prepare()
    counts = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    folder = Path(out) / name
    lines: dict[str, list[str]] = {}
    for stem, part in split_plan(task, counts).items():
        (folder / "images" / stem).mkdir(parents=True, exist_ok=True)
        lines[stem] = []
        for n, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=part.spec(), shuffle_files=False))):
            label = task.label(ex)
            if not 0 <= label < num_classes:
                raise ValueError(f"{name}: example {n} of {part.spec()} has label {label}, outside 0..{num_classes - 1}.")
            rel = f"images/{stem}/{n:06d}.png"
            Image.fromarray(_rgb(ex["image"], task)).save(folder / rel)
            lines[stem].append(f"{rel} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for stem, rows in lines.items():
        (folder / f"{stem}.txt").write_text("".join(f"{r}\n" for r in rows))
    try:
        names = builder.info.features["label"].names
    except (KeyError, AttributeError, TypeError):
        names = None
    if task.named and names is not None and len(names) == num_classes:
        (folder / "classnames.txt").write_text("".join(f"{str(c).replace('_', ' ')}\n" for c in names))
    return {stem: len(rows) for stem, rows in lines.items()}


def load_tfds() -> Any:
    """`tensorflow_datasets`, or an ImportError saying how to get it and what the alternative is."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "Importing VTAB-1k from TFDS needs tensorflow and tensorflow_datasets "
            "(pip install tensorflow tensorflow-datasets). Without them, use a VTAB-1k folder export "
            "(the NOAH layout), which the vtab_* datasets read directly."
        ) from e
    return tfds
