"""Few-shot sampling against a literal re-implementation of Dassl, subsample_classes, and the cache."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

import pytest

from vlm.datamodules.fewshot import (
    fewshot_cache_path,
    load_or_create_fewshot,
    sample_fewshot,
    subsample_classes,
)
from vlm.datamodules.splits import Datum, read_split


def dassl_reference(train: list[Datum], val: list[Datum], num_shots: int, seed: int) -> tuple[list, list]:
    """Dassl `generate_fewshot_dataset` as CoOp's datasets call it, after `set_random_seed(seed)`."""

    def generate(data_source: list[Datum], k: int) -> list[Datum]:
        if k < 1:
            return data_source
        tracker: dict[int, list[Datum]] = defaultdict(list)
        for item in data_source:
            tracker[item.label].append(item)
        dataset: list[Datum] = []
        for _label, items in tracker.items():
            if len(items) >= k:
                sampled_items = random.sample(items, k)
            else:
                sampled_items = items
            dataset.extend(sampled_items)
        return dataset

    state = random.getstate()
    try:
        random.seed(seed)
        return generate(train, num_shots), generate(val, min(num_shots, 4))
    finally:
        random.setstate(state)


def coop_subsample_reference(*args: list[Datum], subsample: str = "all") -> list[list[Datum]]:
    """CoOp `OxfordPets.subsample_classes`, written out literally."""
    if subsample == "all":
        return list(args)
    labels = set()
    for item in args[0]:
        labels.add(item.label)
    labels = sorted(labels)
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    output = []
    for dataset in args:
        output.append(
            [Datum(d.impath, relabeler[d.label], d.classname, d.relpath) for d in dataset if d.label in selected]
        )
    return output


def synthetic(n_classes: int, per_class: list[int], seed: int) -> list[Datum]:
    """Items of n_classes labels with the given counts, interleaved in a shuffled order."""
    rng = random.Random(1000 + seed)
    items = [
        Datum(f"/x/{c}_{i}.jpg", c, f"class{c}", f"{c}_{i}.jpg")
        for c in range(n_classes)
        for i in range(per_class[c % len(per_class)])
    ]
    rng.shuffle(items)
    return items


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_sampler_matches_dassl(seed: int, k: int) -> None:
    train = synthetic(7, [20, 3, 16, 9], seed)
    val = synthetic(7, [5, 2, 8], seed + 1)
    assert sample_fewshot(train, val, k, seed) == dassl_reference(train, val, k, seed)


def test_sampler_leaves_global_random_untouched() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    sample_fewshot(synthetic(3, [10], 0), synthetic(3, [5], 1), 4, seed=1)
    assert random.random() == expected


def test_sampler_on_real_split_file(toy_root: Path) -> None:
    split = read_split(toy_root / "split_zhou_Toy.json", toy_root / "images")
    for seed in (1, 2, 3):
        for k in (1, 4, 16):
            ours = sample_fewshot(split["train"], split["val"], k, seed)
            assert ours == dassl_reference(split["train"], split["val"], k, seed)
    train, val = sample_fewshot(split["train"], split["val"], 4, 1)
    # first-appearance order of labels in the split is 3, 0, 4, 1, 2; label 4 has only 2 items
    order = [d.label for d in train]
    assert order == [3] * 4 + [0] * 4 + [4] * 2 + [1] * 4 + [2] * 4
    assert [d.label for d in val] == [1] * 3 + [0] * 4 + [2] * 4 + [3] * 4 + [4] * 1


def test_zero_shots_keep_everything_and_negative_is_an_error() -> None:
    train, val = synthetic(3, [5], 0), synthetic(3, [2], 1)
    assert sample_fewshot(train, val, 0, seed=1) == (train, val) == dassl_reference(train, val, 0, 1)
    with pytest.raises(ValueError, match=r"num_shots must be >= 0 \(0 = every image\), got -1"):
        sample_fewshot(train, val, -1, seed=1)


def test_strict_mode_names_class_and_count() -> None:
    train = synthetic(3, [5, 2, 5], 0)
    with pytest.raises(ValueError, match=r"Class 1 \('class1'\) has only 2 train examples.*num_shots=4"):
        sample_fewshot(train, [], 4, seed=1, strict=True)
    assert len(sample_fewshot(train, [], 2, seed=1, strict=True)[0]) == 6


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 100])
@pytest.mark.parametrize("subsample", ["all", "base", "new"])
def test_subsample_classes_matches_coop(n: int, subsample: str) -> None:
    train = synthetic(n, [3, 1], 0)
    val = synthetic(n, [2], 1)
    test = synthetic(n, [1], 2)
    ours = subsample_classes(train, val, test, subsample=subsample)
    assert ours == coop_subsample_reference(train, val, test, subsample=subsample)


def test_subsample_odd_classes_and_relabel() -> None:
    items = [Datum(f"p{y}", y, f"c{y}", f"p{y}") for y in (4, 0, 2, 1, 3)]  # n = 5 -> base 0..2, new 3..4
    (base,) = subsample_classes(items, subsample="base")
    (new,) = subsample_classes(items, subsample="new")
    assert sorted((d.classname, d.label) for d in base) == [("c0", 0), ("c1", 1), ("c2", 2)]
    assert sorted((d.classname, d.label) for d in new) == [("c3", 0), ("c4", 1)]
    assert [d.impath for d in base] == ["p0", "p2", "p1"]  # order of the input kept


def test_subsample_label_set_comes_from_first_split() -> None:
    train = [Datum("a", 0, "a"), Datum("b", 2, "b"), Datum("c", 4, "c")]  # sorted {0, 2, 4}: base {0, 2}
    test = [Datum("t", y, str(y)) for y in range(5)]
    _, test_base = subsample_classes(train, test, subsample="base")
    _, test_new = subsample_classes(train, test, subsample="new")
    assert [(d.impath, d.label) for d in test_base] == [("t", 0), ("t", 1)]
    assert [(d.classname, d.label) for d in test_new] == [("4", 0)]
    with pytest.raises(ValueError, match="subsample must be"):
        subsample_classes(train, subsample="novel")  # type: ignore[arg-type]


def test_cache_written_and_reused(toy_root: Path) -> None:
    split = read_split(toy_root / "split_zhou_Toy.json", toy_root / "images")
    cache_dir = toy_root / "split_fewshot"
    train, val = load_or_create_fewshot(split, 4, 2, cache_dir)
    path = fewshot_cache_path(cache_dir, 4, 2)
    assert path.name == "shot_4-seed_2.json" and path.is_file()
    raw = json.loads(path.read_text())
    assert raw["train"] == [[d.relpath, d.label] for d in train]
    assert raw["val"] == [[d.relpath, d.label] for d in val]
    assert (train, val) == sample_fewshot(split["train"], split["val"], 4, 2)

    # Replace the cached subset by another valid one (seed 3's): the cache must win over resampling.
    other_train, other_val = sample_fewshot(split["train"], split["val"], 4, 3)
    assert other_train != train
    raw["train"] = [[d.relpath, d.label] for d in other_train]
    raw["val"] = [[d.relpath, d.label] for d in other_val]
    path.write_text(json.dumps(raw))
    assert load_or_create_fewshot(split, 4, 2, cache_dir) == (other_train, other_val)


def test_cache_mismatch_is_an_error(toy_root: Path) -> None:
    split = read_split(toy_root / "split_zhou_Toy.json", toy_root / "images")
    cache_dir = toy_root / "split_fewshot"
    load_or_create_fewshot(split, 2, 1, cache_dir)
    path = fewshot_cache_path(cache_dir, 2, 1)
    raw = json.loads(path.read_text())
    raw["train"][0][0] = "cat/not_in_split.png"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not match the split.*not_in_split.*delete"):
        load_or_create_fewshot(split, 2, 1, cache_dir)
    raw = json.loads(path.read_text())
    raw["train"] = raw["train"][1:]  # one class now has too few items
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not match the split: class"):
        load_or_create_fewshot(split, 2, 1, cache_dir)


def test_cache_unwritable_falls_back_to_memory(toy_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = read_split(toy_root / "split_zhou_Toy.json", toy_root / "images")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr("vlm.datamodules.fewshot.write_fewshot_cache", refuse)
    with pytest.warns(UserWarning, match="Could not write the few-shot cache"):
        got = load_or_create_fewshot(split, 4, 1, toy_root / "split_fewshot")
    assert got == sample_fewshot(split["train"], split["val"], 4, 1)
