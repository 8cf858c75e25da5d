"""Few-shot subsets and base/new class splits with Dassl/CoOp's exact semantics.

`sample_fewshot` reproduces `DatasetBase.generate_fewshot_dataset` as CoOp calls it after
`set_random_seed(seed)`: group by label in first-appearance order, `random.sample(items, K)`
per label (all items when fewer than K), train with K then val with min(K, 4), both from one
Python `random` stream. We use a private `random.Random(seed)`, which yields the same stream as
`random.seed(seed)` without touching global state. Subsets are cached as JSON index files
(`split_fewshot/shot_{K}-seed_{S}.json`, relpaths + labels) so later runs reuse them, as CoOp
reuses its pickles. `subsample_classes` is CoOp's `OxfordPets.subsample_classes`.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from vlm.datamodules.splits import Datum

Subsample = Literal["all", "base", "new"]
CACHE_FORMAT = "vlm-fewshot-v1"


def split_by_label(items: Sequence[Datum]) -> dict[int, list[Datum]]:
    """Group items by label; keys keep first-appearance order (Dassl's `split_dataset_by_label`)."""
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def check_shots(items: Sequence[Datum], num_shots: int, split: str = "train") -> None:
    """Strict mode: raise if any class of `items` has fewer than `num_shots` examples."""
    for label, group in split_by_label(items).items():
        if len(group) < num_shots:
            raise ValueError(
                f"Class {label} ({group[0].classname!r}) has only {len(group)} {split} examples, fewer "
                f"than num_shots={num_shots}. Lower num_shots, or set strict_shots=False to keep "
                "all of them (Dassl's behaviour)."
            )


def generate_fewshot(
    items: Sequence[Datum], num_shots: int, rng: random.Random, *, strict: bool = False, split: str = "train"
) -> list[Datum]:
    """K examples per label drawn from `rng`, as `generate_fewshot_dataset(..., repeat=False)`.

    `num_shots == 0` returns all items unchanged (Dassl's convention for K < 1); negative is an error.
    """
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0 (0 = every image), got {num_shots}.")
    if num_shots == 0:
        return list(items)
    if strict:
        check_shots(items, num_shots, split)
    out: list[Datum] = []
    for group in split_by_label(items).values():
        out.extend(rng.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def sample_fewshot(
    train: Sequence[Datum], val: Sequence[Datum], num_shots: int, seed: int, *, strict: bool = False
) -> tuple[list[Datum], list[Datum]]:
    """CoOp's few-shot train (K) and val (min(K, 4)) subsets, drawn in that order from seed `seed`."""
    rng = random.Random(seed)
    fs_train = generate_fewshot(train, num_shots, rng, strict=strict, split="train")
    fs_val = generate_fewshot(val, min(num_shots, 4), rng, strict=strict, split="val")
    return fs_train, fs_val


def subsample_classes(*splits: Sequence[Datum], subsample: Subsample = "all") -> list[list[Datum]]:
    """CoOp's `subsample_classes`: base = first ceil(n/2) sorted labels of the FIRST split, new = rest.

    The selected labels are relabelled from 0 (in sorted order) and every split given is filtered
    and relabelled alike. "all" returns copies unchanged.
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}.")
    if subsample == "all" or not splits:
        return [list(s) for s in splits]
    labels = sorted({item.label for item in splits[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return [[replace(d, label=relabel[d.label]) for d in s if d.label in relabel] for s in splits]


def fewshot_cache_path(cache_dir: str | os.PathLike[str], num_shots: int, seed: int) -> Path:
    """CoOp's cache name, as JSON: `<cache_dir>/shot_{K}-seed_{S}.json`."""
    return Path(cache_dir) / f"shot_{num_shots}-seed_{seed}.json"


def _restore(entries: object, pool: Sequence[Datum], key: str, path: Path) -> list[Datum]:
    """Map cached `[relpath, label]` entries back onto the split's Datums, or raise if they do not match."""
    index = {(d.relpath, d.label): d for d in pool}
    if not isinstance(entries, list):
        raise ValueError(f"Few-shot cache '{path}' is malformed: '{key}' is not a list.")
    out: list[Datum] = []
    for e in entries:
        ok = isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)
        found = index.get((e[0], e[1])) if ok else None
        if found is None:
            raise ValueError(
                f"Few-shot cache '{path}' does not match the split: its '{key}' entry {e!r} is not in the "
                f"split's '{key}' list. The split file changed since the cache was written; delete the "
                "cache file to resample (this changes the few-shot subset)."
            )
        out.append(found)
    if len({(d.relpath, d.label) for d in out}) != len(out):
        raise ValueError(f"Few-shot cache '{path}' lists duplicate '{key}' entries; delete it to resample.")
    return out


def _check_counts(chosen: Sequence[Datum], pool: Sequence[Datum], k: int, key: str, path: Path) -> None:
    """A valid cached subset has min(k, n_c) items of every class c of the split."""
    have = {y: len(g) for y, g in split_by_label(chosen).items()}
    for label, group in split_by_label(pool).items():
        want = len(group) if k < 1 else min(k, len(group))
        if have.get(label, 0) != want:
            raise ValueError(
                f"Few-shot cache '{path}' does not match the split: class {label} has {have.get(label, 0)} "
                f"'{key}' items, expected {want}. Delete the cache file to resample."
            )


def write_fewshot_cache(
    path: Path, train: Sequence[Datum], val: Sequence[Datum], num_shots: int, seed: int
) -> None:
    """Write the subset atomically (temp file + rename), so concurrent ranks never read half a file."""
    payload = {
        "format": CACHE_FORMAT,
        "sampler": "dassl.generate_fewshot_dataset (random.seed(seed); train K, val min(K, 4))",
        "num_shots": num_shots,
        "seed": seed,
        "train": [[d.relpath, d.label] for d in train],
        "val": [[d.relpath, d.label] for d in val],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=0)
    os.replace(tmp, path)


def read_fewshot_cache(
    path: Path, split: Mapping[str, Sequence[Datum]], num_shots: int, seed: int
) -> tuple[list[Datum], list[Datum]]:
    """Read a cache file and validate it against the split (membership, K, seed, per-class counts)."""
    try:
        with path.open("r", encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Few-shot cache '{path}' is not valid JSON ({e}); delete it to resample.") from e
    if not isinstance(raw, dict) or raw.get("num_shots") != num_shots or raw.get("seed") != seed:
        raise ValueError(
            f"Few-shot cache '{path}' was not written for num_shots={num_shots}, seed={seed}; delete it to resample."
        )
    train = _restore(raw.get("train"), split.get("train", []), "train", path)
    val = _restore(raw.get("val"), split.get("val", []), "val", path)
    _check_counts(train, split.get("train", []), num_shots, "train", path)
    _check_counts(val, split.get("val", []), min(num_shots, 4), "val", path)
    return train, val


def load_or_create_fewshot(
    split: Mapping[str, Sequence[Datum]],
    num_shots: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
    *,
    strict: bool = False,
) -> tuple[list[Datum], list[Datum]]:
    """Few-shot (train, val) of a split: reuse `<cache_dir>/shot_K-seed_S.json` if present, else sample
    with Dassl's algorithm and write it. `num_shots < 1` means the full splits (no cache). Sampling
    happens on all classes, before `subsample_classes`, as in CoOp (base and new runs share it).
    """
    train, val = split.get("train", []), split.get("val", [])
    if num_shots < 1:
        return list(train), list(val)
    if strict:
        check_shots(train, num_shots, "train")
        check_shots(val, min(num_shots, 4), "val")
    path = fewshot_cache_path(cache_dir, num_shots, seed) if cache_dir is not None else None
    if path is not None and path.is_file():
        return read_fewshot_cache(path, split, num_shots, seed)
    fs_train, fs_val = sample_fewshot(train, val, num_shots, seed, strict=strict)
    if path is not None:
        try:
            write_fewshot_cache(path, fs_train, fs_val, num_shots, seed)
        except OSError as e:  # read-only dataset folders must not stop training; the subset is deterministic
            warnings.warn(f"Could not write the few-shot cache '{path}' ({e}); using the subset in memory.")
    return fs_train, fs_val
