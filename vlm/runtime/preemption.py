"""Preemption and exact resume: the callbacks and plugin the ``vlm`` CLI installs by default.

* :class:`SigtermCheckpoint`: Lightning turns SIGTERM into ``SIGTERMException`` at the next batch
  boundary (under DDP rank 0 broadcasts it so every rank stops at the same step), but saves
  nothing unless SLURM's requeue fired first. This callback saves ``hpc_ckpt_<N>.ckpt`` in
  ``default_root_dir`` when that exception ends ``fit``, the file that ``--ckpt_path hpc`` (and
  Lightning's SLURM auto-resume) reads. Outside SLURM resume with ``vlm fit ... --ckpt_path hpc``.

  SLURM's requeue is Lightning's own, configured with ``SLURMEnvironment``'s public options
  (``auto_requeue``, ``requeue_signal``; ``scripts/slurm/slurm_trainer.yaml``): on the requeue
  signal Lightning's handler saves ``hpc_ckpt_<N>.ckpt`` and runs ``scontrol requeue``. Left alone
  it does so inside the signal handler, in the middle of a step, and training goes on until SLURM
  kills the job. This callback defers that handler to the next batch boundary (every rank agrees
  on the step through ``strategy.reduce_boolean_decision``), runs it there, and stops ``fit``. It
  finds the handler with ``signal.getsignal`` once Lightning has installed it (``on_train_start``);
  nothing of Lightning's is replaced, and Lightning restores the original handlers after ``fit``.

  Either way the process exits with status 128 + the signal (143 for SIGTERM, 138 for SIGUSR1),
  never 0, so ``vlm fit ... && vlm test ...`` does not test a half-trained model.
* :class:`RNGStateCheckpoint`: stores the Python, NumPy and torch (CPU and CUDA) generator states
  in every checkpoint and restores them on resume, so the draws after a resume (shuffles,
  augmentation, prompt dropout) are the ones the uninterrupted run made.
* :func:`install_defaults`: adds both (unless the config already has them) and swaps Lightning's
  default checkpoint IO for :class:`vlm.runtime.checkpoint_io.SafeCheckpointIO`.
"""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from vlm.runtime.checkpoint_io import SafeCheckpointIO

_HPC = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def hpc_checkpoint_path(folder: str | os.PathLike[str]) -> str:
    """``folder/hpc_ckpt_<N+1>.ckpt``, N the highest number of the ``hpc_ckpt_<N>.ckpt`` files there
    (0 if none): the name Lightning's SLURM handler writes and ``--ckpt_path hpc`` picks (the
    highest N). tests/reliability/test_lightning_seams.py checks this against Lightning."""
    numbers = [int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*.ckpt") if (m := _HPC.match(p.name))]
    return os.path.join(str(folder), f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def requeue_signal(trainer: L.Trainer) -> Optional[signal.Signals]:
    """The signal SLURM requeues the job with, if Lightning's auto-requeue is on: the configured
    ``SLURMEnvironment``'s ``requeue_signal`` (a parallel strategy holds it as its public
    ``cluster_environment``), else, under SLURM, ``SLURMEnvironment``'s default (SIGUSR1)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(env, SLURMEnvironment):
        return env.requeue_signal if env.auto_requeue else None
    return SLURMEnvironment().requeue_signal if SLURMEnvironment.detect() else None


class SigtermCheckpoint(L.Callback):
    """On SIGTERM (or SLURM's requeue signal) during ``fit``, save ``hpc_ckpt_<N>.ckpt`` at a batch
    boundary so a restart resumes from this step, and make the process exit non-zero."""

    def __init__(self) -> None:
        self._lightning_handler: Optional[Callable[[int, Any], Any]] = None
        self._signum: Optional[int] = None
        self._requested = False
        self._requeued: Optional[tuple[str, int]] = None

    # -- SLURM requeue: Lightning's handler, deferred to a batch boundary ---------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested, self._requeued, self._lightning_handler = False, None, None
        signum = requeue_signal(trainer)
        if signum is None or os.name == "nt":
            return
        handler = signal.getsignal(signum)
        if not callable(handler) or getattr(handler, "__self__", None) is self:
            return
        self._lightning_handler, self._signum = handler, int(signum)
        try:
            signal.signal(signum, self._request_requeue)
        except ValueError:  # not the main thread: leave Lightning's handler as it is
            self._lightning_handler = None

    def _request_requeue(self, signum: int, frame: Any) -> None:
        self._requested = True

    def _requeue_if_requested(self, trainer: L.Trainer) -> None:
        if self._lightning_handler is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        handler, signum = self._lightning_handler, int(self._signum or signal.SIGUSR1)
        self._lightning_handler = None
        handler(signum, None)  # Lightning's: finalise loggers, save hpc_ckpt_<N>.ckpt, scontrol requeue
        self._requeued = (signal.Signals(signum).name, signum)
        raise SIGTERMException(128 + signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._requeue_if_requested(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requeue_if_requested(trainer)  # a signal after the last boundary (e.g. `should_stop`)

    # -- SIGTERM (and the exit status of both) -----------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._requeued is not None:
            what, signum = self._requeued
            self._requeued = None
            path = "hpc_ckpt_<N>.ckpt (Lightning's SLURM handler) in " + str(trainer.default_root_dir)
        else:
            what, signum = "SIGTERM", int(signal.SIGTERM)
            path = hpc_checkpoint_path(trainer.default_root_dir)  # only rank 0 writes (its name is the one used)
            trainer.save_checkpoint(path)
        exception.code = 128 + signum
        rank_zero_info(
            f"{what}: saved {path} at global step {trainer.global_step}; exiting with status {exception.code} "
            "(the run is not finished). Resume with the same command plus `--ckpt_path hpc` (automatic under SLURM)."
        )


class RNGStateCheckpoint(L.Callback):
    """Saves and restores every global random generator state with the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": _plain(random.getstate()),
            "numpy": _plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(_tuples(state_dict["python"]))
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _plain(value: Any) -> Any:
    """Generator states as lists/ints/floats/str, which ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tuples(value: Any) -> Any:
    """Undo :func:`_plain` for Python's ``random`` state (nested tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def install_defaults(trainer: L.Trainer) -> L.Trainer:
    """Add :class:`SigtermCheckpoint` and :class:`RNGStateCheckpoint` to ``trainer`` unless it already
    has them, and :class:`SafeCheckpointIO` unless a checkpoint IO other than Lightning's default is set."""
    for cls in (SigtermCheckpoint, RNGStateCheckpoint):
        if not any(isinstance(cb, cls) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, cls())
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    return trainer
