"""prepare.py (check / shards) and ShardDataModule: manifests, equal batches per rank, exact evaluation."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.data.layouts import class_folders, write_layout
from vlm.datamodules import ShardDataModule, get_dataset
from vlm.datamodules import webdataset as vwds
from vlm.datamodules.shards import ShardIndexDataset, read_manifest

REPO = Path(__file__).resolve().parents[2]


def _prepare_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlm_prepare_script", REPO / "scripts" / "data" / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare() -> ModuleType:
    return _prepare_module()


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory, prepare: ModuleType) -> dict[str, Path]:
    """EuroSAT class folders -> generated split -> full train/test shards of 4 samples each."""
    root = tmp_path_factory.mktemp("eurosat")
    class_folders("eurosat", root, per_class=10)  # 3 classes x 10 images -> 5/2/3 per class
    prepare.main(["check", "--dataset", "eurosat", "--root", str(root), "--shots", "2", "--seed", "1"])
    out = root / "shards"
    return {
        "root": root,
        "train": prepare.shards("eurosat", root, out, "train", shard_size=4),
        "test": prepare.shards("eurosat", root, out, "test", shard_size=4),
        "fewshot": prepare.shards("eurosat", root, out, "train", shots=2, seed=1, shard_size=4),
    }


def test_check_writes_split_and_fewshot_index(shard_dirs: dict[str, Path]) -> None:
    root = shard_dirs["root"]
    assert (root / "split_zhou_EuroSAT.json").is_file()
    cache = json.loads((root / "split_fewshot" / "shot_2-seed_1.json").read_text())
    assert len(cache["train"]) == 6


def test_check_reports_missing_root(prepare: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare.py check --dataset dtd"):
        prepare.main(["check", "--dataset", "dtd", "--root", str(tmp_path / "none")])


def test_manifest_counts_and_checksums(shard_dirs: dict[str, Path], tmp_path: Path) -> None:
    m = read_manifest(shard_dirs["train"], verify=True)
    assert m["count"] == 15 and m["class_counts"] == [5, 5, 5] and m["shard_size"] == 4
    assert [s["nsamples"] for s in m["shards"]] == [4, 4, 4, 3]
    assert m["classnames"] == ["Annual Crop Land", "River", "Sea or Lake"]
    assert json.loads((shard_dirs["train"] / "sizes.json").read_text()) == {s["url"]: s["nsamples"] for s in m["shards"]}
    fs = read_manifest(shard_dirs["fewshot"])
    assert fs["count"] == 6 and fs["num_shots"] == 2
    with tarfile.open(shard_dirs["train"] / m["shards"][0]["url"]) as tar:  # original bytes, dot-free keys
        names = tar.getnames()
    assert all(n.count(".") == 1 for n in names) and any(n.endswith(".jpg") for n in names)
    copy = tmp_path / "copy"
    shutil.copytree(shard_dirs["train"], copy)
    (copy / m["shards"][0]["url"]).write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="sha256"):
        read_manifest(copy, verify=True)


def test_eval_from_shards_counts_every_sample_once(shard_dirs: dict[str, Path]) -> None:
    dm = ShardDataModule(str(shard_dirs["fewshot"]), test_shards=str(shard_dirs["test"]), transforms={"image_size": 16},
                         loader={"eval_batch_size": 4})
    assert dm.classnames == ["Annual Crop Land", "River"] and dm.test_classnames["new"] == ["Sea or Lake"]
    base, new = dm.test_dataloader()
    seen = torch.cat([b["index"] for b in base]).tolist() + torch.cat([b["index"] for b in new]).tolist()
    assert sorted(seen) == list(range(9))
    assert set(torch.cat([b["label"] for b in new]).tolist()) == {0}
    # Two simulated ranks: disjoint, unpadded, together the whole set.
    ds = ShardIndexDataset(shard_dirs["test"], dm._eval_transform())
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    parts = [list(UnrepeatedDistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(len(ds))) and not set(parts[0]) & set(parts[1])


@pytest.mark.parametrize("mode", ["resampled", "split"])
def test_every_rank_yields_the_same_batches(mode: str, shard_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """4 shards of uneven size over 2 ranks: each rank yields exactly count // (batch x world) batches."""
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(vwds, "rank_and_world", lambda r=rank: (r, 2))
        dm = ShardDataModule(str(shard_dirs["train"]), subsample="all", mode=mode, loader={"batch_size": 2}, transforms={"image_size": 16},
                             shuffle_buffer=4)  # fmt: skip
        loader = dm.train_dataloader()
        batches = list(loader)
        assert all(b["image"].shape == (2, 3, 16, 16) for b in batches)
        counts.append(len(batches))
        assert len(loader) == len(batches)
    assert counts == [15 // (2 * 2)] * 2


def test_split_mode_needs_enough_shards(shard_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vwds, "rank_and_world", lambda: (0, 8))
    dm = ShardDataModule(str(shard_dirs["train"]), mode="split", transforms={"image_size": 16})
    with pytest.raises(ValueError, match="at least world_size x workers = 8 shards"):
        dm.train_dataloader()


def test_missing_manifest_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare.py shards"):
        ShardDataModule(str(tmp_path))


def test_every_layout_converts(prepare: ModuleType, tmp_path: Path) -> None:
    """Any registered dataset converts: one of each family."""
    for name in ("fgvc_aircraft", "vtab_dtd", "cub", "imagenet_r", "cifar_fs", "hta_gtsrb"):
        root = tmp_path / name
        write_layout(name, root)
        split = "test"
        folder = prepare.shards(name, root, tmp_path / "out" / name, split, shard_size=5)
        m = read_manifest(folder, verify=True)
        assert m["count"] == len(get_dataset(name).read(root)[split]) > 0
