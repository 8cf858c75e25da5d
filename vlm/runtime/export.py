"""Exported checkpoints: only what was learned, as safetensors, plus what is needed to rebuild.

``vlm export --ckpt run.ckpt --out DIR`` writes:
  * ``learned.safetensors``: the trainable tensors (prompt vectors, heads), str->str metadata;
  * ``config.yaml``: the resolved run config, with ``model.init_args.init_from: DIR``, so
    ``vlm test --config DIR/config.yaml`` re-evaluates the export;
  * ``classnames.json``: training and test class lists;
  * ``metadata.json``: method, backbone identity and weight checksum, package versions.
Loading refuses an export made with another backbone or method, or with missing/extra tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from vlm.runtime.checkpoint_io import UnsafeCheckpointError, read_safetensors, torch_load
from vlm.runtime.hashing import sha256_file
from vlm.runtime.identity import CHECKPOINT_KEY, CheckpointMismatchError, check_identity
from vlm.runtime.versions import package_versions

WEIGHTS = "learned.safetensors"
CONFIG = "config.yaml"
CLASSNAMES = "classnames.json"
METADATA = "metadata.json"


def load_checkpoint_file(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Load a Lightning ``.ckpt``. ``weights_only=True`` unless the user passes ``trust=True``.

    A damaged file raises ``CorruptCheckpointError`` and a pickle refusal ``UnsafeCheckpointError``;
    both name the file and the fix (here the fix for a refusal is ``--trust``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        return torch_load(path, map_location="cpu", weights_only=not trust)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"Could not load {path} safely: it holds pickled objects ({err.__cause__}). "
            "If you trust this file, pass --trust to load it with full pickle support."
        ) from err.__cause__


def existing_export_files(out: Path) -> list[str]:
    """The files of an earlier export in ``out`` that a new export would replace."""
    return sorted(n for n in (WEIGHTS, CONFIG, CLASSNAMES, METADATA) if (out / n).exists())


def export_checkpoint(ckpt: str | Path, out: str | Path, trust: bool = False, overwrite: bool = False) -> Path:
    """Write an export directory from a ``vlm fit`` checkpoint; returns the directory.

    An ``out`` that already holds an export's files is refused unless ``overwrite`` (one run's export
    must not silently replace another's).
    """
    ckpt, out = Path(ckpt), Path(out)
    existing = existing_export_files(out)
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds an export ({', '.join(existing)}). Choose another --out, or pass --overwrite "
            "to replace it."
        )
    data = load_checkpoint_file(ckpt, trust=trust)
    record = data.get(CHECKPOINT_KEY)
    if record is None:
        raise CheckpointMismatchError(f"{ckpt} was not written by a vlm module (no '{CHECKPOINT_KEY}' record).")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in data["state_dict"].items()}
    identity = {k: record[k] for k in ("format", "method", "module", "backbone", "backbone_checksum")}
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "identity": json.dumps(identity, sort_keys=True),
        "versions": json.dumps(package_versions(), sort_keys=True),
    }
    save_file(tensors, str(out / WEIGHTS), metadata=meta)
    config = record.get("config")
    if config:
        config = json.loads(json.dumps(config))
        config.setdefault("model", {}).setdefault("init_args", {})["init_from"] = str(out.resolve())
        (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (out / CLASSNAMES).write_text(
        json.dumps({"classnames": record.get("classnames"), "test_classnames": record.get("test_classnames")}, indent=1)
    )
    (out / METADATA).write_text(
        json.dumps(
            {
                **identity,
                "versions": package_versions(),
                "source_checkpoint": str(ckpt),
                "source_sha256": sha256_file(ckpt),
                "epoch": data.get("epoch"),
                "global_step": data.get("global_step"),
                "tensors": {k: list(v.shape) for k, v in tensors.items()},
            },
            indent=1,
        )
    )
    return out


def load_exported(module: Any, directory: str | Path) -> dict[str, Any]:
    """Load an export's learned tensors into ``module`` after checking method and backbone."""
    directory = Path(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a vlm export: {WEIGHTS} is missing. Create one with `vlm export`.")
    tensors, meta = read_safetensors(weights)
    saved = json.loads(meta["identity"]) if "identity" in meta else None
    check_identity(saved, module.identity(), source=f"export {directory}")
    module.load_state_dict(tensors)
    return saved or {}


EXPORT_HELP = "Write the learned tensors of a checkpoint as safetensors, with the config to re-test them."


def export_parser() -> Any:
    """The ``vlm export`` argument parser (jsonargparse, so ``vlm --help`` can list it beside fit/test)."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="vlm export", description=EXPORT_HELP, default_env=False)
    p.add_argument("--ckpt", required=True, help="a .ckpt written by `vlm fit`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    p.add_argument("--trust", action="store_true", help="allow full pickle loading of the checkpoint (only for files you trust)")
    return p
