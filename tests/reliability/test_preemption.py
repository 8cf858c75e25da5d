"""Preemption and fault injection in subprocesses: SIGTERM saves and resumes; a dead DDP worker fails fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.datamodules.toydata import make_dataset
from tests.distributed.helpers import REPO, base_env
from tests.reliability.helpers import write_cli_config


def _fit(out: Path, args: list[str], extra: list[str], timeout: int = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.reliability.run_fit", "--out", str(out), *extra, "--", *args]
    return subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=timeout)


def test_sigterm_saves_checkpoint_exits_and_resumes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "toy")
    cfg = write_cli_config(tmp_path, data, tmp_path / "job")
    args = ["--config", str(cfg), "--trainer.max_epochs", "3", "--trainer.deterministic", "true"]
    first = _fit(tmp_path / "first.json", args, ["--fault", "sigterm", "--at", "4"])
    # 128 + SIGTERM: the run is not finished, so `vlm fit ... && vlm test ...` stops here.
    assert first.returncode == 143, first.stderr[-3000:]
    assert "SIGTERM: saved" in first.stderr and "exiting with status 143" in first.stderr
    assert not (tmp_path / "first.json").exists(), "fit must stop at the signal, not finish"
    ckpt = tmp_path / "job" / "hpc_ckpt_1.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and list(saved["state_dict"]) == ["prompt_learner.ctx"]
    second = _fit(tmp_path / "second.json", args, ["--ckpt_path", "hpc"])
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads((tmp_path / "second.json").read_text())
    assert {k: result[k] for k in ("start_step", "global_step")} == {"start_step": 4, "global_step": 9}
    # Step 4 is inside the second epoch (3 steps each): the requeued run ends on the uninterrupted tensors.
    whole = _fit(tmp_path / "whole.json", [*args, "--trainer.default_root_dir", str(tmp_path / "whole")], [])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert json.loads((tmp_path / "whole.json").read_text())["learned"] == result["learned"]


def test_killed_ddp_worker_fails_promptly_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "toy")
    cfg = write_cli_config(tmp_path, data, tmp_path / "job")
    args = [
        "--config", str(cfg), "--trainer.max_epochs", "4", "--trainer.devices", "2",
        "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.init_args.process_group_backend", "gloo",
        "--trainer.strategy.init_args.timeout", "0:00:30",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.dirpath", str(tmp_path / "job" / "ckpt"),
    ]  # fmt: skip
    start = time.monotonic()
    proc = _fit(tmp_path / "out.json", args, ["--fault", "kill_rank1", "--at", "2"], timeout=170)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and not (tmp_path / "out.json").exists(), "a dead worker must fail the job"
    assert elapsed < 150, f"took {elapsed:.0f} s: the job hung instead of failing"
    tail = proc.stderr[-4000:]
    assert any(s in tail for s in ("Connection closed by peer", "Connection reset", "Timed out", "timeout", "Gloo")), tail
    last = torch.load(tmp_path / "job" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] >= 2 and list(last["state_dict"]) == ["prompt_learner.ctx"]
    assert bool(torch.isfinite(last["state_dict"]["prompt_learner.ctx"]).all())
