"""Deterministic N-way K-shot episodes over a split, stored as index files (SAA/SemanticPrompt protocol).

An episode draws `n_way` classes, then `n_shot + n_query` images per class. Episodes come from a
NumPy generator seeded once, so every run sees the same test episodes; `load_or_create_episodes`
writes them as JSON (`<cache>/episodes/<split>_<way>w<shot>s<query>q_<n>-seed_<s>.json`, relpaths)
and reuses them. Accuracy is then reported as mean ± 1.96·std/√episodes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm.datamodules.splits import Datum


@dataclass(frozen=True)
class Episode:
    """Support and query items of one episode; episode labels are 0..n_way-1 in `classes` order."""

    classes: tuple[int, ...]
    support: tuple[int, ...]  # indices into the split list
    query: tuple[int, ...]


def sample_episodes(
    items: Sequence[Datum], n_way: int, n_shot: int, n_query: int, episodes: int, seed: int
) -> list[Episode]:
    """`episodes` episodes drawn from `np.random.default_rng(seed)`; raises if a class is too small."""
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(items):
        groups.setdefault(d.label, []).append(i)
    labels = sorted(groups)
    if len(labels) < n_way:
        raise ValueError(f"{n_way}-way episodes need at least {n_way} classes; the split has {len(labels)}.")
    small = [y for y in labels if len(groups[y]) < n_shot + n_query]
    if small:
        raise ValueError(f"Classes {small[:5]} have fewer than n_shot + n_query = {n_shot + n_query} images.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        classes = [labels[j] for j in rng.choice(len(labels), n_way, replace=False)]
        support, query = [], []
        for y in classes:
            picked = [groups[y][j] for j in rng.choice(len(groups[y]), n_shot + n_query, replace=False)]
            support += picked[:n_shot]
            query += picked[n_shot:]
        out.append(Episode(tuple(classes), tuple(support), tuple(query)))
    return out


def load_or_create_episodes(
    items: Sequence[Datum], split: str, cache_dir: str | Path, n_way: int = 5, n_shot: int = 1,
    n_query: int = 15, episodes: int = 1000, seed: int = 0,
) -> list[Episode]:
    """Episodes from the index file if it exists (checked against `items`), else sampled and written."""
    path = Path(cache_dir) / "episodes" / f"{split}_{n_way}w{n_shot}s{n_query}q_{episodes}-seed_{seed}.json"
    rel = [d.relpath or d.impath for d in items]
    if path.is_file():
        raw = json.loads(path.read_text())
        pos = {r: i for i, r in enumerate(rel)}
        try:
            return [
                Episode(tuple(e["classes"]), tuple(pos[r] for r in e["support"]), tuple(pos[r] for r in e["query"]))
                for e in raw["episodes"]
            ]
        except KeyError as e:
            raise ValueError(f"Episode file '{path}' names image {e} that is not in the split; delete it to resample.") from e
    eps = sample_episodes(items, n_way, n_shot, n_query, episodes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = [{"classes": list(e.classes), "support": [rel[i] for i in e.support], "query": [rel[i] for i in e.query]} for e in eps]
    path.write_text(json.dumps({"format": "vlm-episodes-v1", "seed": seed, "episodes": payload}))
    return eps


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the normal-approximation 95 % half-width 1.96·std/√n (population std, as SAA)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(1.96 * arr.std() / math.sqrt(len(arr))) if len(arr) else 0.0


__all__ = ["Episode", "load_or_create_episodes", "mean_ci95", "sample_episodes"]
