"""``--ckpt_path last`` and ``--ckpt_path best``, resolved by vlm to one file before anything is built.

Lightning resolves these words against the ``ModelCheckpoint`` of the *current* run only: a
``vlm test --ckpt_path last`` (a new run, a new version folder) finds nothing, warns "No checkpoint
will be loaded" and tests the untrained model; a ``vlm fit --ckpt_path last`` after a crash starts
over. vlm resolves them itself, from the parsed config, to a concrete file, or stops with
:class:`CheckpointNotFoundError` naming the folders it searched and the checkpoints it found there.

* The folders: where a run with this config writes checkpoints. With the default logger
  (``<default_root_dir>/lightning_logs/version_<n>``) or a configured logger without a fixed
  ``version``, every version folder of that logger (earlier runs); with a fixed ``version``, that
  folder; with ``logger: false``, ``<default_root_dir>/checkpoints``; plus any ``dirpath`` of a
  configured ``ModelCheckpoint``. ``hpc_ckpt_<n>.ckpt`` files in ``default_root_dir`` (a SIGTERM or
  SLURM requeue save) count as "last" too.
* The run: a checkpoint counts only if the run that wrote it (the ``vlm`` record in the file) used
  the same model and prompt-learner/pruner classes and the same data class and dataset, so a folder
  shared by several experiments (``runs/default``) never hands one experiment another's weights.
* ``last``: the newest such ``last*.ckpt`` or ``hpc_ckpt_*.ckpt`` (the CLI's default ``ModelCheckpoint``
  has ``save_last=True``, vlm.runtime.callbacks.default_callbacks).
* ``best``: the ``best_model_path`` that a ``ModelCheckpoint`` *with a monitor* recorded in the newest
  such checkpoint. Without a monitored metric there is no best: refused, with the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

WORDS = ("last", "best")


class CheckpointNotFoundError(FileNotFoundError):
    """``--ckpt_path`` names no checkpoint (a missing file, or ``last``/``best`` with none to resolve to)."""


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg[a][b]...`` for a jsonargparse Namespace or a dict, ``default`` where a key is missing."""
    value = cfg
    for key in dotted.split("."):
        if value is None:
            return default
        if isinstance(value, Mapping):
            value = value.get(key)
        else:
            value = getattr(value, key, None)
    return default if value is None else value


def _class_paths(items: Any) -> list[tuple[str, Any]]:
    items = items if isinstance(items, list) else [items]
    return [(str(_get(i, "class_path")), _get(i, "init_args", {})) for i in items if _get(i, "class_path")]


def checkpoint_folders(cfg: Any) -> list[Path]:
    """The folders a run with the subcommand config ``cfg`` (and earlier runs with its logger settings)
    writes checkpoints into; see the module docstring."""
    trainer = _get(cfg, "trainer", {})
    root = Path(_get(trainer, "default_root_dir") or os.getcwd())
    folders: list[Path] = []
    for class_path, init_args in _class_paths(_get(trainer, "callbacks", [])):
        if class_path.rsplit(".", 1)[-1].endswith("ModelCheckpoint") and _get(init_args, "dirpath"):
            folders.append(Path(_get(init_args, "dirpath")))
    logger = _get(trainer, "logger")
    loggers = [] if logger is False else _class_paths(logger) if logger not in (None, True) else None
    if loggers is None:  # Lightning's default logger
        folders += sorted((root / "lightning_logs").glob("version_*/checkpoints"))
    elif not loggers:  # logger: false
        folders.append(root / "checkpoints")
    else:
        init_args = loggers[0][1]
        save_dir = Path(_get(init_args, "save_dir") or root)
        name = _get(init_args, "name", "lightning_logs")
        base = save_dir / str(name) if name else save_dir
        version = _get(init_args, "version")
        if version is None:
            folders += sorted(base.glob("version_*/checkpoints"))
        else:
            folders.append(base / (version if isinstance(version, str) else f"version_{version}") / "checkpoints")
    folders.append(root)  # hpc_ckpt_<n>.ckpt
    return list(dict.fromkeys(folders))


def _files(folders: list[Path], root: Path) -> list[Path]:
    found: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        pattern = "hpc_ckpt_*.ckpt" if folder == root else "*.ckpt"
        found += [p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)


def _run_signature(model: Any, data: Any) -> tuple[Any, ...]:
    """What must agree between the run that wrote a checkpoint and this one."""
    return (
        _get(model, "class_path"),
        _get(model, "init_args.prompt_learner.class_path"),
        _get(model, "init_args.pruner.class_path"),
        _get(data, "class_path"),
        _get(data, "init_args.dataset"),
    )


def _load(path: Path) -> Optional[dict[str, Any]]:
    from vlm.runtime.checkpoint_io import torch_load

    try:
        return torch_load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged or pickled: not a candidate (named in the error if nothing else is)
        return None


def _describe(paths: list[Path], limit: int = 8) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return (shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")) or "none"


def resolve_checkpoint_word(word: str, cfg: Any, subcommand: str) -> str:
    """The file ``--ckpt_path <word>`` (``last`` or ``best``) means for the subcommand config ``cfg``,
    or :class:`CheckpointNotFoundError` naming the folders searched and the checkpoints found."""
    folders = checkpoint_folders(cfg)
    root = folders[-1]
    files = _files(folders, root)
    here = _run_signature(_get(cfg, "model"), _get(cfg, "data"))
    ours: list[tuple[Path, dict[str, Any]]] = []
    others: list[Path] = []
    for path in files:
        ckpt = _load(path)
        if ckpt is None:
            others.append(path)
            continue
        run = _get(ckpt, "vlm.config")
        if run is not None and _run_signature(_get(run, "model"), _get(run, "data")) != here:
            others.append(path)
            continue
        ours.append((path, ckpt))
    searched = ", ".join(str(f) for f in folders if f != root) + f" (and hpc_ckpt_*.ckpt in {root})"
    found = f"Checkpoints of this model and data there: {_describe([p for p, _ in ours])}."
    if others:
        found += f" Checkpoints of other runs (another model, method or dataset) or unreadable: {_describe(others)}."
    if word == "last":
        lasts = [p for p, _ in ours if p.name.startswith("last") or p.name.startswith("hpc_ckpt_")]
        if lasts:
            return str(lasts[0])
        raise CheckpointNotFoundError(
            f"vlm {subcommand} --ckpt_path last: no last.ckpt (nor hpc_ckpt_<n>.ckpt) of this run was found. Searched: "
            f"{searched}. {found} Pass a checkpoint file with --ckpt_path <file>, or check trainer.default_root_dir and "
            "the logger's save_dir/name/version: they must be those of the `vlm fit` run (it writes last.ckpt unless "
            "its config sets its own ModelCheckpoint without save_last)."
        )
    for path, ckpt in ours:
        for state in (_get(ckpt, "callbacks", {}) or {}).values():
            if isinstance(state, Mapping) and state.get("monitor") and state.get("best_model_path"):
                best = Path(state["best_model_path"])
                if best.is_file():
                    return str(best)
                raise CheckpointNotFoundError(
                    f"vlm {subcommand} --ckpt_path best: {path} records {best} as the best checkpoint "
                    f"(monitor {state['monitor']!r}), but that file does not exist. {found} Pass a file with --ckpt_path <file>."
                )
    raise CheckpointNotFoundError(
        f"vlm {subcommand} --ckpt_path best: no checkpoint of this run records a best one, because no ModelCheckpoint "
        f"with a monitored metric saved it (vlm's default ModelCheckpoint monitors nothing: it keeps the latest). "
        f"Searched: {searched}. {found} Use --ckpt_path last, pass a file, or fit with "
        "--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.monitor <metric> --trainer.callbacks.mode max."
    )


def check_ckpt_path(value: Any, cfg: Any, subcommand: str) -> Any:
    """``--ckpt_path`` as the Trainer should get it: ``last``/``best`` resolved to a file; an empty
    value or a local file that does not exist refused (:class:`CheckpointNotFoundError`). ``hpc``,
    URLs and ``None`` are passed on."""
    if value is None:
        return None
    text = str(value)
    if text in WORDS:
        return resolve_checkpoint_word(text, cfg, subcommand)
    if text.strip() == "":
        raise CheckpointNotFoundError(f"vlm {subcommand} --ckpt_path is empty: give a checkpoint file, last, best or hpc.")
    if text == "hpc" or "://" in text:
        return value
    if not Path(text).expanduser().is_file():
        folders = checkpoint_folders(cfg)
        files = _files(folders, folders[-1])
        raise CheckpointNotFoundError(
            f"vlm {subcommand} --ckpt_path {text}: no such file. Checkpoints in this run's folders: {_describe(files)}. "
            "Pass one of them, or last / best."
        )
    return value
