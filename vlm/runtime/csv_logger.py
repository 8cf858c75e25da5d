"""A CSV logger that never deletes or replaces what an earlier stage or run wrote into its folder.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder is not empty, and rewrites
``hparams.yaml``. With a fixed ``version`` (``scripts/slurm/slurm_trainer.yaml``: a requeued job
keeps its folder) that erased the fit's metrics on every ``vlm test`` after ``fit`` and on every
requeue. :class:`AppendingCSVLogger` appends to ``metrics.csv`` instead (the existing header is
kept, and extended with its rows preserved when new metric names appear), and writes each run's
hyper-parameters to the first free ``hparams.yaml``, ``hparams.1.yaml``, ... Each stage's resolved
config goes to its own file too (``vlm.runtime.callbacks.StageConfigCallback``). ``vlm fit|test`` also
turn a configured plain ``CSVLogger`` into this one (:func:`make_appending`), so no vlm config can
delete logs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self._hparams_file: Optional[str] = None
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep earlier files; adopt the header of an existing metrics file so rows append under it."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Record hparams into this writer's own file, the first free ``hparams[.<n>].yaml``."""
        from vlm.runtime.callbacks import free_name

        self.hparams.update(params)
        if self._hparams_file is None:
            self._hparams_file = str(free_name(Path(self.log_dir), self.NAME_HPARAMS_FILE))
        save_hparams_to_yaml(self._hparams_file, self.hparams)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) whose ``metrics.csv`` accumulates across stages and resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:  # type: ignore[override]
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def make_appending(logger: object) -> object:
    """Turn a Lightning ``CSVLogger`` (exactly that class) that has not written yet into an
    :class:`AppendingCSVLogger`; the subclass adds no state, so only where it writes changes."""
    if type(logger) is CSVLogger and getattr(logger, "_experiment", None) is None:
        logger.__class__ = AppendingCSVLogger
    return logger
