"""VTAB-1k TFDS importer: task_adaptation's split slices and labels, on an in-memory fake of TFDS's interface."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.distributed.helpers import REPO
from vlm.datamodules import get_dataset
from vlm.datamodules.readers_transfer import VTAB_TASKS
from vlm.datamodules.vtab_tfds import TASKS, Slice, export_task, load_tfds, split_plan


class FakeTFDS:
    """`builder(name, data_dir)` / `as_numpy(ds)`; examples are made on demand, and pixel (0, 0) encodes the index."""

    def __init__(self, sizes: dict[str, int], names: list[str] | None, make: Any) -> None:
        self.sizes, self.names, self.make = sizes, names, make
        self.calls: list[tuple[str, Any]] = []

    def builder(self, name: str, data_dir: str | None = None) -> Any:
        self.calls.append(("builder", (name, data_dir)))
        features = {"label": SimpleNamespace(names=self.names)} if self.names else {}
        info = SimpleNamespace(splits={s: SimpleNamespace(num_examples=n) for s, n in self.sizes.items()}, features=features)
        return SimpleNamespace(info=info, download_and_prepare=lambda: self.calls.append(("prepare", name)), as_dataset=self._as_dataset)

    def _as_dataset(self, split: str, shuffle_files: bool = True) -> list[dict[str, Any]]:
        assert not shuffle_files
        self.calls.append(("as_dataset", split))
        m = re.fullmatch(r"(\w+)\[(\d*):(\d*)\]", split)
        assert m, split
        name = m.group(1)
        start, stop = int(m.group(2) or 0), int(m.group(3) or self.sizes[name])
        return [self.make(name, i) for i in range(start, min(stop, self.sizes[name]))]

    @staticmethod
    def as_numpy(ds: list[dict[str, Any]]) -> Any:
        return iter(ds)


def _rgb_example(split: str, i: int) -> dict[str, Any]:
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0] = (i % 256, i // 256, 0 if split == "train" else 1)
    return {"image": image, "label": i % 100}


def _decode(path: Path) -> tuple[int, int]:
    px = np.asarray(Image.open(path))[0, 0]
    return int(px[0]) + 256 * int(px[1]), int(px[2])


def test_split_plans_match_task_adaptation() -> None:
    assert set(TASKS) == set(VTAB_TASKS)
    plan = split_plan(TASKS["cifar"], {"train": 50000, "test": 10000})
    assert plan == {"train800": Slice("train", 0, 800), "val200": Slice("train", 45000, 45200), "test": Slice("test")}
    assert plan["val200"].spec() == "train[45000:45200]" and plan["test"].spec() == "test[0:]"
    assert split_plan(TASKS["oxford_iiit_pet"], {"train": 3680, "test": 3669})["val200"] == Slice("train", 2944, 3144)
    assert split_plan(TASKS["dtd"], {"train": 1880, "validation": 1880, "test": 1880})["val200"] == Slice("validation", 0, 200)
    eurosat = split_plan(TASKS["eurosat"], {"train": 27000})
    assert eurosat["val200"] == Slice("train", 16200, 16400) and eurosat["test"] == Slice("train", 21600)
    dsprites = split_plan(TASKS["dsprites_loc"], {"train": 737280})
    assert dsprites["val200"] == Slice("train", 589824, 590024) and dsprites["test"] == Slice("train", 663552)
    norb = split_plan(TASKS["smallnorb_ele"], {"train": 24300, "test": 24300})
    assert norb["val200"] == Slice("test", 0, 200) and norb["test"] == Slice("test", 12150)
    assert split_plan(TASKS["clevr_count"], {"train": 70000, "validation": 15000})["test"] == Slice("validation")


def test_derived_labels() -> None:
    assert TASKS["clevr_count"].label({"objects": {"size": [0] * 10}}) == 7
    coords = lambda z: {"objects": {"pixel_coords": np.array([[0, 0, z], [0, 0, 50.0]])}}  # noqa: E731
    assert [TASKS["clevr_dist"].label(coords(z)) for z in (7.0, 8.2, 9.7, 20.0)] == [0, 1, 4, 5]
    kitti = lambda types, zs: {"objects": {"type": np.array(types), "location": np.array([[0, 0, z] for z in zs])}}  # noqa: E731
    assert TASKS["kitti"].label(kitti([0, 4], [10.0, 2.0])) == 1  # the pedestrian (type 4) at 2 m is no vehicle
    assert TASKS["kitti"].label(kitti([4], [3.0])) == 3 and TASKS["kitti"].label(kitti([2], [5.0])) == 0
    assert TASKS["dsprites_loc"].label({"label_x_position": 31}) == 15
    assert TASKS["dsprites_ori"].label({"label_orientation": 39}) == 15 and TASKS["dsprites_ori"].label({"label_orientation": 5}) == 2


def test_cifar_export_is_read_by_the_registry(tmp_path: Path) -> None:
    names = [f"name_{i}" for i in range(100)]
    fake = FakeTFDS({"train": 1200, "test": 7}, names, _rgb_example)
    counts = export_task(fake, "cifar", tmp_path, data_dir="/tfds")
    assert counts == {"train800": 800, "val200": 120, "test": 7, "train800val200": 920}  # the fake's train has 1200
    assert fake.calls[:2] == [("builder", ("cifar100:3.*.*", "/tfds")), ("prepare", "cifar100:3.*.*")]
    assert [c[1] for c in fake.calls[2:]] == ["train[0:800]", "train[1080:1280]", "test[0:]"]
    split = get_dataset("vtab_cifar").read(tmp_path)
    assert {k: len(v) for k, v in split.items()} == {"train": 800, "val": 120, "test": 7, "train800val200": 920}
    first_val = split["val"][0]
    assert _decode(Path(first_val.impath)) == (1080, 0) and first_val.label == 1080 % 100
    assert first_val.classname == "name 80"
    assert _decode(Path(split["test"][6].impath)) == (6, 1)
    assert [d.impath for d in split["train800val200"]] == [d.impath for d in split["train"] + split["val"]]


def test_grey_derived_task(tmp_path: Path) -> None:
    def norb(split: str, i: int) -> dict[str, Any]:
        return {"image": np.full((3, 3, 1), i % 200, np.uint8), "label_azimuth": i % 18, "label_elevation": i % 9}

    fake = FakeTFDS({"train": 810, "test": 420}, ["unused"], norb)
    counts = export_task(fake, "smallnorb_ele", tmp_path, prepare=False)
    assert counts == {"train800": 800, "val200": 200, "test": 210, "train800val200": 1000}
    assert ("prepare", "smallnorb:2.*.*") not in fake.calls
    assert not (tmp_path / "smallnorb_ele" / "classnames.txt").exists()
    split = get_dataset("vtab_smallnorb_ele").read(tmp_path)
    last = split["test"][-1]  # test = test[210:]: its last example is test index 419
    assert last.label == 419 % 9 and np.asarray(Image.open(last.impath)).shape == (3, 3, 3)
    assert np.asarray(Image.open(last.impath))[0, 0].tolist() == [419 % 200] * 3


def test_bad_labels_and_missing_tfds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeTFDS({"train": 10, "validation": 5, "test": 5}, None, lambda s, i: {"image": np.zeros((2, 2, 3), np.uint8), "label": 47})
    with pytest.raises(ValueError, match="label 47, outside 0..46"):
        export_task(fake, "dtd", tmp_path)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install tensorflow tensorflow-datasets"):
        load_tfds()
    spec = importlib.util.spec_from_file_location("vlm_import_vtab", REPO / "scripts" / "data" / "import_vtab_tfds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--tasks", "dtd"]) == 2
    assert "tensorflow_datasets" in capsys.readouterr().err
