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

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from vlm.modules.base import CHECKPOINT_KEY, CheckpointMismatchError, check_identity
from vlm.versions import package_versions

WEIGHTS = "learned.safetensors"
CONFIG = "config.yaml"
CLASSNAMES = "classnames.json"
METADATA = "metadata.json"


def load_checkpoint_file(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Load a Lightning ``.ckpt``. ``weights_only=True`` unless the user passes ``trust=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # pickle refusal or a corrupt file
        raise ValueError(
            f"Could not load {path} safely ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "If you trust this file, pass --trust to load it with full pickle support."
        ) from err


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_checkpoint(ckpt: str | Path, out: str | Path, trust: bool = False) -> Path:
    """Write an export directory from a ``vlm fit`` checkpoint; returns the directory."""
    ckpt, out = Path(ckpt), Path(out)
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
                "source_sha256": _sha256(ckpt),
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
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta: Optional[dict[str, str]] = f.metadata()
    saved = json.loads(meta["identity"]) if meta and "identity" in meta else None
    check_identity(saved, module.identity(), source=f"export {directory}")
    module.load_state_dict(load_file(str(weights)))
    return saved or {}
