"""Subprocess driver: `vlm fit` with a fault injected at one step (not run by pytest itself).

    python -m tests.reliability.run_fit --out out.json [--fault sigterm|kill_rank1 --at N] [--ckpt_path P] -- <vlm fit args>

``sigterm`` sends SIGTERM to this process after step N (a preemption outside SLURM);
``kill_rank1`` makes DDP rank 1 die abruptly (``os._exit``) after step N. Rank 0 writes ``--out``
(start step, final step, sha256 of the learned tensors) when fit returns normally.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from typing import Any, Optional

import lightning as L

from vlm.runtime.cli import VLMCLI


class Fault(L.Callback):
    """Injects the fault after training step ``at``; records where fit started."""

    def __init__(self, kind: Optional[str], at: int) -> None:
        self.kind, self.at = kind, at
        self.start_step: Optional[int] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.at:
            return
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "kill_rank1" and trainer.global_rank == 1:
            os._exit(17)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--fault", choices=["sigterm", "kill_rank1"], default=None)
    p.add_argument("--at", type=int, default=-1)
    p.add_argument("--ckpt_path", default=None, help="resume from this checkpoint ('hpc', 'last' or a path)")
    own, rest = p.parse_known_args(argv)
    rest = rest[1:] if rest and rest[0] == "--" else rest
    cli = VLMCLI(args=rest, run=False)
    fault = Fault(own.fault, own.at)
    cli.trainer.callbacks.append(fault)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=own.ckpt_path)
    if cli.trainer.is_global_zero:
        with open(own.out, "w") as f:
            learned = hashlib.sha256()
            for name, value in sorted(cli.model.state_dict().items()):  # trainable tensors only
                learned.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
            json.dump({"start_step": fault.start_step, "global_step": cli.trainer.global_step, "learned": learned.hexdigest()}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
