"""Preemption and exact resume: the callbacks and plugin the ``vlm`` CLI installs by default.

* :class:`SigtermCheckpoint`: Lightning turns SIGTERM into ``SIGTERMException`` at the next batch
  boundary (its signal connector; under DDP rank 0 broadcasts it so every rank stops at the same
  step), but saves nothing unless SLURM's SIGUSR1 requeue fired first. This callback saves
  ``hpc_ckpt_<N>.ckpt`` in ``default_root_dir`` when that exception ends ``fit``, the file SLURM
  auto-resume already picks up. Outside SLURM resume with ``vlm fit ... --ckpt_path hpc``.
  SLURM's requeue signal (SIGUSR1, ``auto_requeue``) now also stops ``fit`` at the next batch
  boundary, where Lightning's own handler then saves ``hpc_ckpt_<N>.ckpt`` and requeues the job
  (instead of saving in the middle of a step and training on until the job is killed).
  Either way the process exits with status 128 + the signal (143 for SIGTERM, 138 for SIGUSR1),
  never 0, so ``vlm fit ... && vlm test ...`` does not test a half-trained model.
* :class:`RNGStateCheckpoint`: stores the Python, NumPy and torch (CPU and CUDA) generator states
  in every checkpoint and restores them on resume, so the draws after a resume (shuffles,
  augmentation, prompt dropout) are the ones the uninterrupted run made.
* :func:`install_defaults`: adds both (unless the config already has them) and swaps Lightning's
  default checkpoint IO for :class:`vlm.runtime.checkpoint_io.SafeCheckpointIO`.
"""

from __future__ import annotations

import random
import signal
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from vlm.runtime.checkpoint_io import SafeCheckpointIO


class SigtermCheckpoint(L.Callback):
    """On SIGTERM (or SLURM's requeue signal) during ``fit``, save ``hpc_ckpt_<N>.ckpt`` at a batch
    boundary so a restart resumes from this step, and make the process exit non-zero."""

    def __init__(self) -> None:
        self._requeue: Optional[tuple[Callable[[int, Any], None], int]] = None

    def requeue_requested(self, lightning_handler: Callable[[int, Any], None], signum: int) -> None:
        """SLURM's requeue signal arrived: stop at the next batch boundary, then let Lightning's
        handler save and requeue there (see :func:`_stop_on_requeue_signal`)."""
        self._requeue = (lightning_handler, signum)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        # The same path Lightning's SLURM requeue handler writes and its auto-resume reads.
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        if self._requeue is not None:
            handler, signum = self._requeue
            self._requeue = None
            handler(signum, None)  # Lightning's SLURM handler: finalise loggers, save `path`, scontrol requeue
            what = signal.Signals(signum).name
        else:
            signum, what = signal.SIGTERM, "SIGTERM"
            trainer.save_checkpoint(path)
        exception.code = 128 + int(signum)
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


def _stop_on_requeue_signal(trainer: L.Trainer, callback: SigtermCheckpoint) -> None:
    """Make SLURM's requeue signal stop ``fit`` like SIGTERM does (flag, then ``SIGTERMException`` at
    the next batch boundary, broadcast from rank 0 under DDP), deferring Lightning's own handler
    (save ``hpc_ckpt`` + ``scontrol requeue``) to :meth:`SigtermCheckpoint.on_exception`. Lightning
    registers ``connector._slurm_sigusr_handler_fn`` when ``fit`` starts, so the instance attribute
    set here is what it registers."""
    connector = trainer._signal_connector
    lightning_handler = connector._slurm_sigusr_handler_fn
    if getattr(lightning_handler, "_vlm_deferred", False):
        return

    def handler(signum: int, frame: Any) -> None:
        callback.requeue_requested(lightning_handler, signum)
        connector.received_sigterm = True

    handler._vlm_deferred = True  # type: ignore[attr-defined]
    connector._slurm_sigusr_handler_fn = handler  # type: ignore[method-assign]


def install_defaults(trainer: L.Trainer) -> L.Trainer:
    """Add :class:`SigtermCheckpoint`, :class:`RNGStateCheckpoint` and :class:`SafeCheckpointIO`
    to ``trainer`` unless it already has them (or a checkpoint IO other than Lightning's default),
    and route SLURM's requeue signal through :class:`SigtermCheckpoint`."""
    for cls in (SigtermCheckpoint, RNGStateCheckpoint):
        if not any(isinstance(cb, cls) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, cls())
    sigterm = next(cb for cb in trainer.callbacks if isinstance(cb, SigtermCheckpoint))
    _stop_on_requeue_signal(trainer, sigterm)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    return trainer
