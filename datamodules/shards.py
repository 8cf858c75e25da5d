"""Writing webdataset shards from split lists, and reading them back map-style for exact evaluation.

`write_shards` stores each image's original encoded bytes (no re-encode, so shard and folder
pipelines see the same pixels), `cls` (int label) and `json` (class name, relpath, index), keyed by
a zero-padded dot-free index, through `webdataset.ShardWriter` with a fixed `shard_size`. Train
items are shuffled once with a recorded seed so shard order approximates a global shuffle; eval
items keep their order. `manifest.json` records counts (total, per class, per shard), each
shard's sha256, the class names and the source; `sizes.json` is open_clip's per-shard count file.

`ShardIndexDataset` indexes the tar members once (offset and size per member) and then reads
any sample by key: a map-style view of the shards, so evaluation can use an unpadded
per-rank sampler and count every sample exactly once.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from vlm.datamodules.splits import Datum
from vlm.datamodules.transforms import strict_decoding, to_rgb

from vlm.runtime.hashing import sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vlm-shards-v1"
_EXT = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".ppm": "ppm", ".bmp": "bmp", ".webp": "webp"}


def write_shards(
    items: Sequence[Datum],
    out_dir: str | Path,
    *,
    prefix: str,
    classnames: Sequence[str],
    shard_size: int = 1000,
    shuffle_seed: int | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `items` as `<out_dir>/<prefix>-%06d.tar` shards of `shard_size` samples; return the manifest."""
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    order = list(range(len(items)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index in order:
            d = items[index]
            ext = _EXT.get(Path(d.impath).suffix.lower())
            if ext is None:
                raise ValueError(f"Unsupported image type '{d.impath}'; supported: {sorted(set(_EXT.values()))}.")
            info = {"classname": d.classname, "relpath": d.relpath, "index": index, "label": d.label}
            sink.write({"__key__": f"{index:09d}", ext: Path(d.impath).read_bytes(), "cls": d.label, "json": info})
    shards = []
    for path in sorted(out.glob(f"{prefix}-*.tar")):
        with tarfile.open(path) as tar:
            n = sum(1 for m in tar.getmembers() if m.name.endswith(".cls"))
        shards.append({"url": path.name, "nsamples": n, "sha256": sha256_file(path)})
    class_counts = [0] * len(classnames)
    for d in items:
        class_counts[d.label] += 1
    manifest = {
        "format": MANIFEST_FORMAT,
        **(meta or {}),
        "prefix": prefix,
        "count": len(items),
        "shard_size": shard_size,
        "shuffle_seed": shuffle_seed,
        "classnames": list(classnames),
        "class_counts": class_counts,
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (out / "sizes.json").write_text(json.dumps({s["url"]: s["nsamples"] for s in shards}))
    return manifest


def read_manifest(folder: str | Path, verify: bool = False) -> dict[str, Any]:
    """`<folder>/manifest.json`, checked against the shards present (and their sha256 with `verify`)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"No shard manifest at '{path}'. Write the shards with: python scripts/data/prepare.py shards "
            "--dataset NAME --root DATA_ROOT --out OUT_DIR --split SPLIT [--shots K --seed S]"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"'{path}' is not a {MANIFEST_FORMAT} manifest (format={manifest.get('format')!r}).")
    for shard in manifest["shards"]:
        file = folder / shard["url"]
        if not file.is_file():
            raise FileNotFoundError(f"Shard '{file}' listed in '{path}' is missing; re-run prepare.py shards.")
        if verify and sha256_file(file) != shard["sha256"]:
            raise ValueError(f"Shard '{file}' does not match its sha256 in '{path}'; it is corrupt or was replaced.")
    return manifest


class ShardIndexDataset(Dataset):
    """Map-style access to the samples of a shard folder, in key order, as `{"image", "label", "index"}`.

    `keep_labels`, if given, keeps only samples of those labels and relabels them 0..len-1 in that
    order (base/new subsets). Tar files are opened lazily per process (safe with DataLoader workers).
    """

    def __init__(
        self, folder: str | Path, transform: Callable[[Image.Image], torch.Tensor], keep_labels: Sequence[int] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.transform = transform
        relabel = {y: i for i, y in enumerate(keep_labels)} if keep_labels is not None else None
        entries: list[tuple[str, str, int, int, int]] = []  # (key, shard, image offset, image size, label)
        for shard in self.manifest["shards"]:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(self.folder / shard["url"]) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = m
                for key, parts in members.items():
                    label = int(tar.extractfile(parts["cls"]).read())  # type: ignore[union-attr]
                    if relabel is not None and label not in relabel:
                        continue
                    image = next(parts[e] for e in ("jpg", "png", "ppm", "bmp", "webp") if e in parts)
                    new = relabel[label] if relabel is not None else label
                    entries.append((key, shard["url"], image.offset_data, image.size, new))
        self.entries = sorted(entries)
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        key, shard, offset, size, label = self.entries[i]
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = (self.folder / shard).open("rb")
        f.seek(offset)
        with Image.open(io.BytesIO(f.read(size))) as raw, strict_decoding():
            image = to_rgb(raw)
        return {"image": self.transform(image), "label": torch.tensor(label), "index": torch.tensor(int(key))}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # file handles stay in the process that opened them
        return state
