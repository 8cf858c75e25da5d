"""Reading CoOp split files, and the errors for broken layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm.datamodules.splits import Datum, check_images_exist, classnames_in_label_order, read_split, split_file_path
from tests.datamodules.toydata import CLASSNAMES, TEST_COUNTS, TRAIN_COUNTS, VAL_COUNTS


def test_read_split(toy_root: Path) -> None:
    path = split_file_path(toy_root, "Toy")
    assert path == toy_root / "split_zhou_Toy.json"
    split = read_split(path, toy_root / "images", check_files=True)
    assert set(split) == {"train", "val", "test"}
    assert len(split["train"]) == sum(TRAIN_COUNTS.values())
    first = split["train"][0]
    assert isinstance(first, Datum)
    assert first == Datum(str(toy_root / "images" / "owl/train_0.png"), 3, "owl", "owl/train_0.png")
    assert classnames_in_label_order(split["test"]) == CLASSNAMES
    assert len(split["test"]) == sum(TEST_COUNTS.values())


def test_missing_root_names_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"Dataset root .*nowhere' does not exist.*split_zhou_<Name>\.json"):
        read_split(split_file_path(missing, "OxfordPets"), missing / "images")


def test_missing_split_file_lists_what_is_there(toy_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"split_zhou_OxfordPets\.json' not found.*split_zhou_Toy\.json"):
        read_split(split_file_path(toy_root, "OxfordPets"), toy_root / "images")


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "split_zhou_X.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_split(tmp_path / "split_zhou_X.json", tmp_path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ([1, 2], "top level must be an object"),
        ({"train": []}, r"missing key\(s\) \['test'\]"),
        ({"train": {"a": 1}, "test": []}, "'train' must be a list"),
        ({"train": [["a.png", 0]], "test": []}, r"entry 0 of 'train' is \['a.png', 0\]"),
        ({"train": [["a.png", "0", "cat"]], "test": []}, "label: int >= 0"),
        ({"train": [["a.png", -1, "cat"]], "test": []}, "entry 0 of 'train'"),
        ({"train": [], "test": [["a.png", 0, "cat"], ["b.png", True, "cat"]]}, "entry 1 of 'test'"),
        ({"train": [["a.png", 0, "cat"], ["b.png", 0, "dog"]], "test": []}, "label 0 is named both 'cat' and 'dog'"),
    ],
)
def test_malformed_entries(tmp_path: Path, content: object, pattern: str) -> None:
    (tmp_path / "split_zhou_X.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=pattern):
        read_split(tmp_path / "split_zhou_X.json", tmp_path)


def test_val_optional_and_extra_keys(tmp_path: Path) -> None:
    content = {"train": [["a.png", 0, "cat"]], "test": [["b.png", 0, "cat"]], "pretrain": [["c.png", 0, "cat"]]}
    (tmp_path / "split_zhou_X.json").write_text(json.dumps(content))
    split = read_split(tmp_path / "split_zhou_X.json", tmp_path)
    assert set(split) == {"train", "test", "pretrain"}


def test_missing_images_are_counted(dataset_factory) -> None:
    root = dataset_factory("noimg", write_images=False)
    (root / "images" / "cat").mkdir(parents=True)
    total = sum(TRAIN_COUNTS.values()) + sum(VAL_COUNTS.values()) + sum(TEST_COUNTS.values())
    with pytest.raises(FileNotFoundError, match=rf"{total} of {total} images listed in the split are missing.*first 5"):
        read_split(root / "split_zhou_Toy.json", root / "images", check_files=True)


def test_some_missing_images(toy_root: Path) -> None:
    split = read_split(toy_root / "split_zhou_Toy.json", toy_root / "images")
    (toy_root / "images" / "dog" / "test_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images .*dog/test_1\.png"):
        check_images_exist(split, image_root=toy_root / "images")


def test_wrong_image_dir_is_explained(toy_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image root itself does not exist: check `image_dir`"):
        read_split(toy_root / "split_zhou_Toy.json", toy_root / "jpg", check_files=True)
