"""``results.json``: what every ``vlm test`` run writes into its log directory (CONTRACTS.md).

A folder that already holds one (a second ``vlm test`` with ``logger: false``, which writes into
``default_root_dir``, or with a fixed logger ``version``) gets ``results.1.json``, ``results.2.json``,
..., numbered as the resolved configs are (``config_test.1.yaml``): no run replaces another's results.

It also records which weights were tested (``checkpoint``: the ``.ckpt`` and/or the ``vlm export``
directory, each with its sha256), and :func:`check_tested_weights` refuses a ``vlm test`` that
would score learned parameters nothing restored (their random initialisation) unless asked to.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L

from vlm.datamodules.protocols import NamedData, ReportedData

from vlm.runtime.hashing import sha256_file
from vlm.runtime.versions import package_versions


def collect_results(trainer: L.Trainer, model: L.LightningModule, config_path: Optional[str], seed: Optional[int]) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    dm = getattr(trainer, "datamodule", None)
    backbone = getattr(model, "backbone", None)
    extra = dm.result_extras if isinstance(dm, ReportedData) else None
    model_extra = getattr(model, "result_extras", None)
    return {
        "metrics": metrics,
        "seed": seed if seed is not None else _env_seed(),
        "method": getattr(model, "method_name", type(model).__name__),
        "dataset": (dm.dataset if isinstance(dm, NamedData) else None) or (type(dm).__name__ if dm is not None else None),
        "backbone": backbone.identity() if backbone is not None else None,
        "config": config_path,
        "checkpoint": tested_weights(trainer, model),
        "versions": package_versions(),
        **({"data": extra() if callable(extra) else extra} if extra else {}),
        **({"model": model_extra()} if callable(model_extra) else {}),
    }


class UntrainedModelError(ValueError):
    """``vlm test`` of learned parameters that no checkpoint or export restored."""


def learned_names(model: L.LightningModule) -> list[str]:
    """Names of the parameters that training updates (those a test without weights leaves initial)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def check_tested_weights(model: L.LightningModule, ckpt_path: Optional[str], allow_untrained: bool = False) -> None:
    """Refuse to test a model whose learned parts neither ``ckpt_path`` nor ``init_from`` restores.

    A zero-shot CLIP (nothing learned) needs neither. ``allow_untrained`` tests the initial values
    anyway (e.g. a learned context initialised from a phrase), with a warning and
    ``checkpoint.untrained: true`` in ``results.json``.
    """
    learned = learned_names(model)
    if ckpt_path or getattr(model, "init_from", None) or not learned:
        return
    method = getattr(model, "method_name", type(model).__name__)
    if allow_untrained:
        warnings.warn(
            f"vlm test: testing the UNTRAINED learned parameters of {type(model).__name__} ({method}): "
            f"{len(learned)} tensors at their initial values (--allow_untrained true).", stacklevel=2
        )
        return
    raise UntrainedModelError(
        f"vlm test: {type(model).__name__} ({method}) has learned parameters ({', '.join(learned[:3])}"
        f"{' ...' if len(learned) > 3 else ''}) but neither --ckpt_path nor model.init_args.init_from restores "
        "them, so the test would score their random or initial values. Pass --ckpt_path "
        "<run>/checkpoints/<name>.ckpt (or last / best), or test an export with --config <export>/config.yaml. "
        "For zero-shot CLIP leave out the prompt-learner config; to test the initial values on purpose add "
        "--allow_untrained true."
    )


def tested_weights(trainer: L.Trainer, model: L.LightningModule) -> dict[str, Any]:
    """Which weights the test scored: the checkpoint the trainer loaded and/or the export the model
    was built from (``init_from``), each as an absolute path with its sha256, and whether learned
    parts were untrained."""
    ckpt = getattr(trainer, "ckpt_path", None)
    init_from = getattr(model, "init_from", None)
    record: dict[str, Any] = {"ckpt_path": os.path.abspath(ckpt) if ckpt else None, "ckpt_sha256": None,
                              "init_from": os.path.abspath(init_from) if init_from else None, "init_from_sha256": None}
    if ckpt and Path(ckpt).is_file():
        record["ckpt_sha256"] = sha256_file(Path(ckpt))
    if init_from:
        from vlm.runtime.export import WEIGHTS

        tensors = Path(init_from) / WEIGHTS
        record["init_from_sha256"] = sha256_file(tensors) if tensors.is_file() else None
    record["untrained"] = not ckpt and not init_from and bool(learned_names(model))
    return record


def print_metrics(outputs: Optional[list[dict[str, float]]], title: str) -> dict[str, float]:
    """Print the metrics that ``trainer.test``/``validate`` returned (one dict per dataloader) once
    each, in one table; return them. A metric logged across dataloaders is in every dict with the
    same value, which Lightning's own table prints once per dataloader."""
    merged: dict[str, float] = {}
    for per_loader in outputs or []:
        for name, value in per_loader.items():
            merged.setdefault(name, float(value))
    if merged:
        from rich import get_console
        from rich.table import Table

        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in merged.items():
            table.add_row(name, f"{value:.4f}")
        get_console().print(table)
    return merged


def _env_seed() -> Optional[int]:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None


def write_results(trainer: L.Trainer, model: L.LightningModule, config_path: Optional[str] = None, seed: Optional[int] = None) -> Path:
    """Write this test's results into ``trainer.log_dir`` (or ``default_root_dir``) on rank 0 and
    return the file: ``results.json``, or the first free ``results.<n>.json`` when an earlier run's
    results are there (``vlm.runtime.callbacks.free_name``, the configs' numbering). The file is
    written under a temporary name and linked into place, so it never replaces an existing one, not
    even one that a concurrent run created in between."""
    from vlm.runtime.callbacks import free_name

    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if not trainer.is_global_zero:
        return log_dir / "results.json"
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = log_dir / f".results.{os.getpid()}.json.tmp"
    tmp.write_text(json.dumps(collect_results(trainer, model, config_path, seed), indent=1))
    try:
        while True:
            path = free_name(log_dir, "results.json")
            try:
                os.link(tmp, path)  # fails if the name was taken since free_name looked
                return path
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links: the name was free a moment ago
                os.replace(tmp, path)
                return path
    finally:
        tmp.unlink(missing_ok=True)
