"""Subprocess driver for the distributed tests: `vlm` configs -> fit, then test, in one process group.

    python -m tests.distributed.run_cli --out result.json [--signal-at-step N | --stop-at-step N] [--ckpt_path P]
        [--no-test] -- <vlm fit args>

Lightning's DDP launcher re-runs this same command for the other local ranks, so it must not run
inside pytest. Rank 0 writes `--out`: the learned prompt tensors, the test metrics, every test
sample index each rank evaluated (to prove each is counted exactly once) and the step the fit
started from (to prove a requeued run resumed). `--signal-at-step N` sends SIGUSR1 to this process
after step N, as SLURM does before a preemption; the process then exits with vlm's status for a
stopped run (128 + the signal), after writing `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from vlm.runtime.callbacks import BaseNewReport
from vlm.runtime.cli import VLMCLI, release_process_group


class Record(L.Callback):
    """Records the start step and, per test dataloader, the `index` of every evaluated sample."""

    def __init__(self, signal_at_step: int | None, stop_at_step: int | None = None) -> None:
        self.signal_at_step = signal_at_step
        self.stop_at_step = stop_at_step
        self.start_step: int | None = None
        self.indices: dict[int, list[int]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.signal_at_step is not None and trainer.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)  # Lightning's SLURM handler saves hpc_ckpt_N and requeues
            trainer.should_stop = True
        if self.stop_at_step is not None and trainer.global_step == self.stop_at_step:
            trainer.should_stop = True  # every rank stops after the same step (an interruption)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self.indices.setdefault(dataloader_idx, []).extend(batch["index"].tolist())


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--signal-at-step", type=int, default=None)
    p.add_argument("--no-test", action="store_true")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop every rank after step N (no signal)")
    p.add_argument("--ckpt_path", default=None, help="resume fit from this checkpoint")
    own, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    cli = VLMCLI(args=rest, run=False)
    record = Record(own.signal_at_step, own.stop_at_step)
    cli.trainer.callbacks.append(record)
    stopped: SystemExit | None = None
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=own.ckpt_path)
    except SystemExit as err:  # a signal stopped fit (vlm.runtime.preemption): record, then exit with its status
        stopped = err
    metrics: dict[str, float] = {}
    per_rank: list[dict[int, list[int]]] = [record.indices]
    if not own.no_test and stopped is None:
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
        if dist.is_available() and dist.is_initialized():
            per_rank = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(per_rank, record.indices)
    if cli.trainer.is_global_zero:
        learned = {k: v.detach().cpu().double().flatten().tolist() for k, v in cli.model.state_dict().items()}
        out = {
            "learned": learned,
            "metrics": metrics,
            "indices_per_rank": [{str(k): v for k, v in r.items()} for r in per_rank],
            "start_step": record.start_step,
            "global_step": cli.trainer.global_step,
            "world_size": cli.trainer.world_size,
            "base_new_report": next((cb.rows for cb in cli.trainer.callbacks if isinstance(cb, BaseNewReport)), None),
            "torch": torch.__version__,
        }
        with open(own.out, "w") as f:
            json.dump(out, f)
    release_process_group()  # a clean exit code: see its docstring
    if stopped is not None:
        raise stopped


if __name__ == "__main__":
    main(sys.argv[1:])
