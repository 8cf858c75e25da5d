"""A CSV logger that never deletes or replaces what an earlier stage or run wrote into its folder.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder is not empty, and rewrites
``hparams.yaml``. With a fixed ``version`` (``scripts/slurm/slurm_trainer.yaml``: a requeued job
keeps its folder) that erased the fit's metrics on every ``vlm test`` after ``fit`` and on every
requeue. :class:`AppendingCSVLogger` (a ``CSVLogger`` with the same arguments, named in configs as
``class_path: vlm.runtime.csv_logger.AppendingCSVLogger``) appends to ``metrics.csv`` instead (the
existing header is kept, and extended with its rows preserved when new metric names appear), and
writes each run's hyper-parameters to the first free ``hparams.yaml``, ``hparams.1.yaml``, ... Each
stage's resolved config goes to its own file too (``vlm.runtime.callbacks.StageConfigCallback``).

It overrides only the public ``experiment`` property (and ``finalize``), with a writer of its own
(:class:`AppendingWriter`). A config that names Lightning's plain ``CSVLogger`` gets this class
instead, in the config, before anything is built (:func:`appending_logger_config`, called by the
``vlm`` CLI), so no vlm run deletes logs and the saved ``config_<stage>.yaml`` names the class used.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

#: The class paths of Lightning's plain CSV logger, which :func:`appending_logger_config` replaces.
PLAIN_CSV_LOGGER = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger", "CSVLogger")
APPENDING_CSV_LOGGER = "vlm.runtime.csv_logger.AppendingCSVLogger"


class AppendingWriter:
    """Writes ``metrics.csv`` and ``hparams[.<n>].yaml`` into ``log_dir`` without deleting anything."""

    NAME_METRICS_FILE = "metrics.csv"
    NAME_HPARAMS_FILE = "hparams.yaml"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []
        self.hparams: dict[str, Any] = {}
        self._fs = get_filesystem(log_dir)
        self._fs.makedirs(log_dir, exist_ok=True)
        self._hparams_file: Optional[str] = None
        self.metrics_keys: list[str] = sorted(self._header())

    def _header(self) -> list[str]:
        if not self._fs.isfile(self.metrics_file_path):
            return []
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            return next(csv.reader(f), [])

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = len(self.metrics) if step is None else step
        self.metrics.append(row)

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Record hparams into this writer's own file, the first free ``hparams[.<n>].yaml``."""
        from vlm.runtime.callbacks import free_name

        self.hparams.update(params)
        if self._hparams_file is None:
            self._hparams_file = str(free_name(Path(self.log_dir), self.NAME_HPARAMS_FILE))
        save_hparams_to_yaml(self._hparams_file, self.hparams)

    def save(self) -> None:
        """Append the recorded rows; a new metric name rewrites the file with the wider header first."""
        if not self.metrics:
            return
        new = set().union(*self.metrics) - set(self.metrics_keys)
        exists = self._fs.isfile(self.metrics_file_path)
        self.metrics_keys = sorted(set(self.metrics_keys) | new)
        if new and exists:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = list(csv.DictReader(f))
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
        with self._fs.open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) whose ``metrics.csv`` accumulates across stages and resumes."""

    _writer: Optional[AppendingWriter] = None

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:  # type: ignore[override]
        if self._writer is None:
            self._writer = AppendingWriter(log_dir=self.log_dir)
        return self._writer

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._writer is not None:  # nothing was logged in this process (e.g. a DDP launcher's main)
            self.save()


def appending_logger_config(logger: Any) -> Any:
    """``trainer.logger``'s config with every Lightning ``CSVLogger`` replaced by :class:`AppendingCSVLogger`
    (a ``class_path`` change; the arguments are the same). Other values are returned unchanged."""
    if isinstance(logger, list):
        return [appending_logger_config(item) for item in logger]
    class_path = getattr(logger, "class_path", None) if not isinstance(logger, dict) else logger.get("class_path")
    if class_path in PLAIN_CSV_LOGGER:
        if isinstance(logger, dict):
            return {**logger, "class_path": APPENDING_CSV_LOGGER}
        logger.class_path = APPENDING_CSV_LOGGER
    return logger
