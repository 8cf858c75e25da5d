"""Pickle releases of CIFAR-FS / FC100 / tieredImageNet -> {base,val,novel} trees the episodic registry reads."""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.distributed.helpers import REPO
from vlm.datamodules import get_dataset
from vlm.datamodules.episodic_pickles import CIFAR100_CLASSES, import_cifar_pickles, import_tiered

CIFAR_LABELS = {"train": [0, 1, 0, 1], "val": [2, 2], "test": [98, 99, 98]}  # apple, aquarium_fish | baby | woman, worm


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _script():
    spec = importlib.util.spec_from_file_location("vlm_import_episodic", REPO / "scripts" / "data" / "import_episodic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dataset,prefix", [("cifar_fs", "CIFAR_FS"), ("fc100", "FC100")])
def test_cifar_pickles(dataset: str, prefix: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, labels in CIFAR_LABELS.items():
        arrays[split] = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        _dump(tmp_path / f"{prefix}_{split}.pickle", {"data": arrays[split], "labels": labels})
    out = tmp_path / "out"
    assert _script().main(["--dataset", dataset, "--src", str(tmp_path), "--out", str(out)]) == 0
    split = get_dataset(dataset).read(out)
    assert {k: len(v) for k, v in split.items()} == {"train": 4, "val": 2, "test": 3}
    assert sorted({d.classname for d in split["train"]}) == ["apple", "aquarium fish"]
    assert {d.classname for d in split["test"]} == {"woman", "worm"}
    first = next(d for d in split["test"] if d.classname == "worm")
    assert np.array_equal(np.asarray(Image.open(first.impath)), arrays["test"][1])  # lossless, right image per class
    assert len({d.label for v in split.values() for d in v}) == 5  # disjoint classes, global labels


def test_cifar_pickle_with_bad_labels(tmp_path: Path) -> None:
    for split in CIFAR_LABELS:
        _dump(tmp_path / f"FC100_{split}.pickle", {"data": np.zeros((1, 32, 32, 3), np.uint8), "labels": [100]})
    with pytest.raises(ValueError, match="CIFAR-100 fine-label ids"):
        import_cifar_pickles(tmp_path, tmp_path / "out", "fc100")
    assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES[:2] == ["apple", "aquarium_fish"]


def _png(value: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 5, 3), value, np.uint8)).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


@pytest.mark.parametrize("images", ["npz", "png_pkl"])
def test_tiered(images: str, tmp_path: Path) -> None:
    wnids = {"train": ["n01530575", "n01531178"], "val": ["n01440764"], "test": ["n02085620", "n02085782"]}
    values: dict[str, list[int]] = {}
    for split, names in wnids.items():
        labels = [i % len(names) for i in range(4)]
        values[split] = [10 * i + 3 for i in range(4)]
        _dump(tmp_path / f"{split}_labels.pkl", {"label_specific": np.array(labels), "label_general": np.zeros(4, int),
                                                 "label_specific_str": names, "label_general_str": ["x"]})  # fmt: skip
        if images == "npz":
            np.savez(tmp_path / f"{split}_images.npz", images=np.stack([np.full((5, 5, 3), v, np.uint8) for v in values[split]]))
        else:
            _dump(tmp_path / f"{split}_images_png.pkl", [_png(v) for v in values[split]])
    out = tmp_path / "out"
    assert import_tiered(tmp_path, out) == {"train": 4, "val": 4, "test": 4}
    (out / "classnames.txt").write_text("n01530575 house finch\n")
    split = get_dataset("tiered_imagenet").read(out)
    assert {k: len(v) for k, v in split.items()} == {"train": 4, "val": 4, "test": 4}
    assert {d.classname for d in split["train"]} == {"house finch", "n01531178"}
    pixel = {Path(d.impath).name: int(np.asarray(Image.open(d.impath))[0, 0, 0]) for d in split["test"]}
    assert pixel == {f"{i:06d}.png": values["test"][i] for i in range(4)}
    assert Path(split["test"][0].impath).parent.name == "n02085620"
    if images == "png_pkl":  # shipped PNG bytes are written unchanged
        assert (out / "novel" / "n02085620" / "000000.png").read_bytes() == _png(values["test"][0]).tobytes()


def test_tiered_label_table_mismatch(tmp_path: Path) -> None:
    _dump(tmp_path / "train_labels.pkl", {"label_specific": np.array([0, 3]), "label_specific_str": ["a", "b"]})
    with pytest.raises(ValueError, match="2 names but the labels reach 3"):
        import_tiered(tmp_path, tmp_path / "out")
