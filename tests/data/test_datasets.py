"""The dataset registry: every registered layout reads a tiny generated copy; bad roots give useful errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.layouts import class_folders, coop_split, write_layout
from vlm.datamodules import DatasetDataModule, DatasetLayoutError, available_datasets, get_dataset
from vlm.datamodules.episodic import load_or_create_episodes
from vlm.metrics import mean_ci95
from vlm.datamodules.readers_coop import imagenet_subset_indices
from vlm.datamodules.templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT

COOP_11 = {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
           "sun397", "dtd", "eurosat", "ucf101"}
HTA_10 = {"hta_cifar10", "hta_cifar100", "hta_dtd", "hta_cub", "hta_nabirds", "hta_stanford_dogs", "hta_flowers",
          "hta_food101", "hta_gtsrb", "hta_svhn"}


def test_registry_covers_the_benchmarks() -> None:
    names = set(available_datasets())
    assert COOP_11 <= names and HTA_10 == set(available_datasets("hta"))
    assert {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"} == set(available_datasets("imagenet_ood"))
    assert {"cub", "nabirds", "fgvc_flowers", "fgvc_cars", "stanford_dogs"} == set(available_datasets("fgvc"))
    assert len(available_datasets("vtab")) == 19
    assert {"mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100"} == set(available_datasets("episodic"))
    with pytest.raises(KeyError, match="Available: .*oxford_pets"):
        get_dataset("oxford_pet")


@pytest.mark.parametrize("name", available_datasets())
def test_reads_its_layout(name: str, tmp_path: Path) -> None:
    spec = get_dataset(name)
    expected = write_layout(name, tmp_path / name)
    if spec.prepare is not None:
        spec.prepare(tmp_path / name, spec, False)
    split = spec.read(tmp_path / name)
    assert {k: len(split[k]) for k in expected.counts} == expected.counts
    names: dict[int, str] = {}
    for items in split.values():
        for d in items:
            assert Path(d.impath).is_file(), d.impath
            assert names.setdefault(d.label, d.classname) == d.classname
    assert max(names) < expected.num_classes
    assert [names[y] for y in sorted(names)] == [expected.classnames[y] for y in sorted(names)]


@pytest.mark.parametrize("name", available_datasets())
def test_missing_root_names_layout_and_command(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError) as e:
        get_dataset(name).read(tmp_path / "nowhere")
    msg = str(e.value)
    assert "does not exist" in msg and "Expected layout" in msg
    assert f"scripts/data/prepare.py check --dataset {name} --root" in msg


def test_malformed_roots(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    coop_split("oxford_pets", root)
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": [["a.jpg", "x", "cat"]], "val": [], "test": []}))
    with pytest.raises(DatasetLayoutError, match="malformed split file.*entry 0"):
        get_dataset("oxford_pets").read(root)
    (root / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DatasetLayoutError, match="missing split file.*split_zhou_OxfordPets.json"):
        get_dataset("oxford_pets").read(root)
    vt = tmp_path / "vtab"
    write_layout("vtab_dtd", vt)
    (vt / "dtd" / "val200.txt").write_text("images/val/0.jpg not-a-label\n")
    with pytest.raises(DatasetLayoutError, match="line 1 of .*val200.txt"):
        get_dataset("vtab_dtd").read(vt)
    with pytest.raises(DatasetLayoutError, match="(?s)has not been exported yet.*--download"):
        get_dataset("hta_cifar10").read(tmp_path)


def test_torchvision_layout_is_accepted(tmp_path: Path) -> None:
    """The same split file works when the images sit where torchvision downloads them."""
    root = tmp_path / "pets"
    coop_split("oxford_pets", root, image_dir="oxford-iiit-pet/images")
    split = get_dataset("oxford_pets").read(root)
    assert "oxford-iiit-pet/images" in split["train"][0].impath


@pytest.mark.parametrize("name", ["caltech101", "eurosat"])
def test_prepare_writes_a_split_from_class_folders(name: str, tmp_path: Path) -> None:
    spec = get_dataset(name)
    class_folders(name, tmp_path)
    written = spec.prepare(tmp_path, spec, False)
    assert [p.name for p in written] == [f"split_zhou_{spec.options['split_name']}.json"]
    split = spec.read(tmp_path)
    n_classes = 2 if name == "caltech101" else 3  # Caltech101 drops BACKGROUND_Google
    assert {k: len(v) for k, v in split.items()} == {"train": 5 * n_classes, "val": 2 * n_classes, "test": 3 * n_classes}
    names = {d.classname for d in split["train"]}
    assert names == ({"face", "airplane"} if name == "caltech101" else {"Annual Crop Land", "Sea or Lake", "River"})
    assert spec.prepare(tmp_path, spec, False) == []  # present: nothing rewritten


def test_datamodule_base_new_and_template(tmp_path: Path) -> None:
    write_layout("eurosat", tmp_path)
    dm = DatasetDataModule(str(tmp_path), "eurosat", num_shots=2, transforms={"image_size": 16}, loader={"batch_size": 2})
    assert dm.template == "a centered satellite photo of {}."
    assert dm.classnames == ["alpha_one", "beta"] and dm.test_classnames["new"] == ["gamma"]
    dm.setup("fit")
    assert len(dm.train_set) == 4 and (tmp_path / "split_fewshot" / "shot_2-seed_1.json").is_file()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16)


def test_test_only_dataset_and_ensembles(tmp_path: Path) -> None:
    write_layout("imagenet_a", tmp_path)
    dm = DatasetDataModule(str(tmp_path), "imagenet_a", test_subsets=["all"], transforms={"image_size": 16})
    assert dm.test_classnames["all"] == ["goldfish", "great white shark"]
    assert dm.templates("imagenet80") == IMAGENET_TEMPLATES and len(dm.templates("imagenet7")) == 7
    assert dm.templates("imagenet7") == IMAGENET_TEMPLATES_SELECT
    dm.setup("test")
    assert [len(ds) for ds in dm.test_sets] == [4]
    with pytest.raises(ValueError, match="test-only dataset"):
        dm.setup("fit")
    assert imagenet_subset_indices(tmp_path, "imagenet_a") == [1, 2]


def test_vtab_final_split_keeps_sparse_labels(tmp_path: Path) -> None:
    write_layout("vtab_dtd", tmp_path)
    dm = DatasetDataModule(str(tmp_path), "vtab_dtd", num_shots=0, subsample="all", test_subsets=["all"],
                           train_split="train800val200", transforms={"image_size": 16})
    assert dm.num_classes == 47  # labels 0, 1, 46 present: the class list still has all 47 classes
    dm.setup("fit")
    assert len(dm.train_set) == 15


def test_episodes_are_stored_and_reused(tmp_path: Path) -> None:
    write_layout("mini_imagenet", tmp_path)
    split = get_dataset("mini_imagenet").read(tmp_path)
    eps = load_or_create_episodes(split["test"], "test", tmp_path, n_way=2, n_shot=1, n_query=2, episodes=5, seed=0)
    again = load_or_create_episodes(split["test"], "test", tmp_path, n_way=2, n_shot=1, n_query=2, episodes=5, seed=0)
    assert eps == again and len(eps) == 5
    assert all(len(e.support) == 2 and len(e.query) == 4 for e in eps)
    assert mean_ci95([1.0, 1.0]) == (1.0, 0.0)
