"""Configs and a subprocess runner shared by the distributed and SLURM tests (tiny CLIP, toy data, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.datamodules.toydata import make_dataset
from tests.helpers import tiny_clip_cfg

REPO = Path(__file__).resolve().parents[2]


def toy_data(root: Path) -> Path:
    """The toy CoOp dataset with an odd-sized base test set (7), so a padding sampler would double-count."""
    make_dataset(root)
    split_file = root / "split_zhou_Toy.json"
    split = json.loads(split_file.read_text())
    drop = next(i for i, e in enumerate(split["test"]) if e[1] == 0)
    del split["test"][drop]
    split_file.write_text(json.dumps(split))
    return root


def write_config(tmp: Path, data_root: Path, batch_size: int, max_epochs: int = 2, run_dir: Path | None = None) -> Path:
    """One YAML for every world size: only `--trainer.devices` / `--data.init_args.loader.batch_size` change."""
    run_dir = run_dir or tmp / "run"
    cfg: dict[str, Any] = {
        "seed_everything": 3,
        "model": {
            "class_path": "vlm.modules.CLIPClassifier",
            "init_args": {
                "backbone": {"class_path": "vlm.backbones.ClipBackbone", "init_args": {"model_name": "tiny", "model_cfg": tiny_clip_cfg()}},
                "prompt_learner": {"class_path": "coop", "init_args": {"n_ctx": 4}},
                "optim": {"name": "sgd", "lr": 0.05},
            },
        },
        "data": {
            "class_path": "vlm.datamodules.FewShotDataModule",
            "init_args": {
                "root": str(data_root), "dataset": "Toy", "num_shots": 2,
                "transforms": {"image_size": 32, "train": ["normalize"]},  # deterministic: identical inputs on every rank
                "loader": {"batch_size": batch_size, "eval_batch_size": 2},
            },
        },
        "trainer": {
            "max_epochs": max_epochs,
            "accelerator": "cpu",
            "strategy": "ddp",
            "devices": 1,
            "default_root_dir": str(run_dir),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "", "version": "v0"}},
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's env minus any launcher/SLURM variables, plus the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update({"PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1"})  # fmt: skip
    env.update(extra or {})
    return env


def run_cli(
    out: Path, args: list[str], env: dict[str, str], timeout: int = 120, extra: list[str] | None = None, returncode: int = 0
) -> dict[str, Any]:
    """Run tests/distributed/run_cli.py in a subprocess; return what rank 0 wrote. The process must
    exit with ``returncode`` (128 + the signal for a run stopped by SIGTERM/SIGUSR1)."""
    cmd = [sys.executable, "-m", "tests.distributed.run_cli", "--out", str(out), *(extra or []), "--", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != returncode or not out.is_file():
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}, expected {returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(out.read_text())
