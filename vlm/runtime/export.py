"""Exported checkpoints: only what was learned, as safetensors, plus what is needed to rebuild.

``vlm export --ckpt run.ckpt --out DIR`` writes:
  * ``learned.safetensors``: the trainable tensors (prompt vectors, heads), str->str metadata;
  * ``config.yaml``: the resolved run config, with ``model.init_args.init_from: .``, so
    ``vlm test --config DIR/config.yaml`` re-evaluates the export;
  * ``classnames.json``: training and test class lists;
  * ``metadata.json``: method, backbone identity and weight checksum, package versions;
  * ``.vlm-export``: the marker that says the folder is an export (see below).
Loading refuses an export made with another backbone or method, or with missing/extra tensors.

An export is self-contained: the one path inside it, ``init_from``, is relative to the export (a
relative path in a config file is read from that file's folder: ``vlm.runtime.paths``), so a copy
or a moved export tests its own tensors, and deleting the original breaks nothing.

``--out`` must be a new or empty folder, or an earlier export (it has the marker), which
``--overwrite`` replaces. Any other folder is refused whatever the flag, so that an export never
replaces a user's own ``config.yaml`` or other files (:class:`ExportFolderError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

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
MARKER = ".vlm-export"
#: ``init_from`` in an export's config.yaml: the export itself (the config file's own folder).
SELF = "."


class MissingExportError(FileNotFoundError):
    """``init_from`` names a folder that holds no export (moved, deleted, or never one)."""


class ExportFolderError(FileExistsError):
    """``vlm export --out`` names a folder that an export must not write into: one that holds an
    earlier export (without ``--overwrite``), or a non-empty folder that is not a vlm export."""


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


def is_export(directory: Path) -> bool:
    """Whether ``directory`` was written by ``vlm export`` (it holds the :data:`MARKER` file)."""
    return (directory / MARKER).is_file()


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that the export would damage (:class:`ExportFolderError`, naming the folder
    and the fix): a file; a non-empty folder without the export marker, whatever ``overwrite`` says
    (its ``config.yaml`` or other files may be the user's own); an earlier export unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ExportFolderError(f"--out {out} is a file, not a folder. Choose a new or empty folder for the export.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_export(out):
        held = sorted(p.name for p in out.iterdir())
        raise ExportFolderError(
            f"--out {out} is not empty ({', '.join(held[:6])}{' ...' if len(held) > 6 else ''}) and is not a vlm export "
            f"(no {MARKER} marker), so `vlm export` does not write into it, with or without --overwrite: its files, "
            "e.g. a config.yaml of your own, would be replaced. Choose a new or empty --out folder."
        )
    existing = existing_export_files(out)
    if existing and not overwrite:
        raise ExportFolderError(
            f"{out} already holds an export ({', '.join(existing)}). Choose another --out, or pass --overwrite "
            "to replace it."
        )


def export_checkpoint(ckpt: str | Path, out: str | Path, trust: bool = False, overwrite: bool = False) -> Path:
    """Write an export directory from a ``vlm fit`` checkpoint; returns the directory.

    ``out`` must be new, empty, or an earlier export; the last only with ``overwrite`` (one run's
    export must not silently replace another's), and a folder that is not an export never
    (:func:`check_out_folder`). The marker is written first, so an export cut short is still
    recognised as one and can be overwritten.
    """
    ckpt, out = Path(ckpt), Path(out)
    check_out_folder(out, overwrite)
    data = load_checkpoint_file(ckpt, trust=trust)
    record = data.get(CHECKPOINT_KEY)
    if record is None:
        raise CheckpointMismatchError(f"{ckpt} was not written by a vlm module (no '{CHECKPOINT_KEY}' record).")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in data["state_dict"].items()}
    identity = {k: record[k] for k in ("format", "method", "module", "backbone", "backbone_checksum")}
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        "Written by `vlm export`: a self-contained export (paths inside are relative to this folder). "
        "`vlm export --overwrite` may replace this folder's export files.\n"
    )
    meta = {
        "identity": json.dumps(identity, sort_keys=True),
        "versions": json.dumps(package_versions(), sort_keys=True),
    }
    save_file(tensors, str(out / WEIGHTS), metadata=meta)
    config = record.get("config")
    if config:
        config = json.loads(json.dumps(config))
        config.setdefault("model", {}).setdefault("init_args", {})["init_from"] = SELF  # the export, wherever it is
        (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (out / CLASSNAMES).write_text(
        json.dumps({"classnames": record.get("classnames"), "test_classnames": record.get("test_classnames")}, indent=1)
    )
    (out / METADATA).write_text(
        json.dumps(
            {
                **identity,
                "versions": package_versions(),
                "source_checkpoint": os.path.abspath(ckpt),  # provenance, outside the export: absolute
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
        raise MissingExportError(
            f"{directory} is not a vlm export: {WEIGHTS} is missing. Point model.init_args.init_from at an export folder "
            "(create one with `vlm export`). An export's own config.yaml says `init_from: .` (the folder it is in); one "
            "written by an older vlm names the folder it was first written to: change that line to `init_from: .`."
        )
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier export in --out (a folder that is not a vlm export is always refused)")
    p.add_argument("--trust", action="store_true", help="allow full pickle loading of the checkpoint (only for files you trust)")
    p.add_argument("--format", choices=["vlm", "dassl"], default="vlm",
                   help="vlm: an export folder; dassl: OUT/<model name>/model.pth.tar-N in the layout of the released "
                        "code of the learner (--ckpt may then also be an export folder; vlm.runtime.released)")
    p.add_argument("--epoch", type=Optional[int], default=None, help="with --format dassl: the N of model.pth.tar-N")
    return p
