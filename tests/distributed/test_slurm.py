"""SLURM: the sbatch templates' srun command line as Lightning receives it, and SIGUSR1 auto-requeue + resume."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from tests.distributed.helpers import REPO, base_env, run_cli, toy_data, write_config
from tests.helpers import tiny_clip_cfg
from vlm.runtime.cli import VLMCLI

RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["{var}"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def _stand_in(folder: Path, name: str, var: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(RECORDER.format(var=var))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _slurm_env(nodes: int, per_node: int, job_id: str = "4242") -> dict[str, str]:
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "vlm-fit", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NTASKS": str(nodes * per_node), "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
    }  # fmt: skip


def _header(script: Path) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))


@pytest.mark.parametrize("script,nodes,per_node", [("fit_1node.sbatch", 1, 4), ("fit_multinode.sbatch", 2, 4)])
def test_sbatch_command_line_reaches_lightning(script: str, nodes: int, per_node: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "scripts" / "slurm" / script
    header = _header(path)
    assert header["signal"] == "SIGUSR1@90" and header["nodes"] == str(nodes)
    assert header["ntasks-per-node"] == header["gres"].rsplit(":", 1)[1] == str(per_node)
    cfg = write_config(tmp_path, toy_data(tmp_path / "toy"), batch_size=2)
    bin_dir, record = tmp_path / "bin", tmp_path / "srun.jsonl"
    _stand_in(bin_dir, "srun", "SRUN_RECORD")
    env = {**os.environ, **_slurm_env(nodes, per_node), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_RECORD": str(record),
           "CONFIGS": f"--config {cfg}", "RUN_DIR": str(tmp_path / "job")}  # fmt: skip
    subprocess.run(["bash", str(path)], cwd=REPO, env=env, check=True, timeout=30)
    (argv,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert argv[:2] == ["vlm", "fit"]
    for k, v in _slurm_env(nodes, per_node).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    cli = VLMCLI(args=argv[2:], run=False)
    trainer = cli.trainer
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (nodes, per_node, nodes * per_node)
    assert isinstance(trainer.strategy, DDPStrategy)
    env_plugin = trainer.strategy.cluster_environment
    assert isinstance(env_plugin, SLURMEnvironment) and env_plugin.auto_requeue
    assert trainer.default_root_dir == str(tmp_path / "job")
    assert trainer.logger.log_dir == str(tmp_path / "job" / "logs")


def test_sigusr1_saves_requeues_and_resumes(tmp_path: Path) -> None:
    data = toy_data(tmp_path / "toy")
    cfg = write_config(tmp_path, data, batch_size=6, max_epochs=4, run_dir=tmp_path / "job")
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.jsonl"
    _stand_in(bin_dir, "scontrol", "SCONTROL_RECORD")
    env = base_env({**_slurm_env(1, 1), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SCONTROL_RECORD": str(record)})
    args = ["--config", str(cfg), "--trainer.strategy", "auto"]
    # 128 + SIGUSR1 (10): the job is requeued, not finished, so a following `vlm test` does not run.
    first = run_cli(tmp_path / "first.json", args, env, extra=["--signal-at-step", "2", "--no-test"], returncode=138)
    assert first["start_step"] == 0 and first["global_step"] == 2
    assert [json.loads(line) for line in record.read_text().splitlines()] == [["requeue", "4242"]]
    ckpt = tmp_path / "job" / "hpc_ckpt_1.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and list(saved["state_dict"]) == ["prompt_learner.ctx"]
    # The requeued job: same command, same folder, no ckpt_path -> resumes from hpc_ckpt_1.ckpt.
    second = run_cli(tmp_path / "second.json", args, env, extra=["--no-test"])
    assert second["start_step"] == 2 and second["global_step"] == 4
    assert second["learned"]["prompt_learner.ctx"] != saved["state_dict"]["prompt_learner.ctx"].double().flatten().tolist()


@pytest.mark.parametrize("script", ["fit_1node.sbatch", "fit_multinode.sbatch"])
def test_fit_scripts_need_no_folder_before_submission(script: str) -> None:
    """SLURM opens --output before the script runs; in a folder that does not exist yet (the old
    runs/slurm/) the job fails without a log. The fit scripts write it into the submit directory."""
    output = _header(REPO / "scripts" / "slurm" / script)["output"]
    assert "/" not in output and output.endswith(".out"), output


def _sweep_workdir(tmp: Path) -> Path:
    """A fresh submit directory: the repo's configs and scripts, no runs/ folder."""
    work = tmp / "work"
    work.mkdir()
    for name in ("configs", "scripts"):
        (work / name).symlink_to(REPO / name)
    return work


def test_sweep_creates_its_log_folder_before_submitting(tmp_path: Path) -> None:
    """sweep_task.sbatch writes its output into runs/slurm/: sweep.sh creates it before sbatch."""
    work = _sweep_workdir(tmp_path)
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch.jsonl"
    _stand_in(bin_dir, "sbatch", "SBATCH_RECORD")
    env = {**base_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_RECORD": str(record), "CONFIGS": "--config x.yaml",
           "DATASETS": "dtd eurosat", "SEEDS": "1 2"}  # fmt: skip
    subprocess.run(["bash", "scripts/slurm/sweep.sh"], cwd=work, env=env, check=True, timeout=30)
    assert _header(REPO / "scripts" / "slurm" / "sweep_task.sbatch")["output"].startswith("runs/slurm/")
    assert (work / "runs" / "slurm").is_dir()
    (argv,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert argv[0] == "--array=0-3" and argv[-1] == "scripts/slurm/sweep_task.sbatch"


SRUN = """#!/bin/bash
exec "$@"
"""


def test_sweep_task_fit_then_test_keeps_the_fit_logs(tmp_path: Path) -> None:
    """One sweep cell as sweep_task.sbatch runs it (srun vlm fit, then srun vlm test on its newest
    checkpoint, both with slurm_trainer.yaml's fixed logger folder): the test's results.json lands
    beside the fit's metrics rows and config, which it neither deletes nor replaces."""
    from tests.data.layouts import write_layout

    work = _sweep_workdir(tmp_path)
    write_layout("dtd", work / "data" / "dtd")
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump({
        "model": {"class_path": "vlm.modules.CLIPClassifier", "init_args": {
            "backbone": {"class_path": "vlm.backbones.ClipBackbone", "init_args": {"model_name": "tiny", "model_cfg": tiny_clip_cfg()}},
            "prompt_learner": {"class_path": "coop", "init_args": {"n_ctx": 2}}}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "max_steps": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
    }))  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = base_env({
        **_slurm_env(1, 1), "SLURM_ARRAY_TASK_ID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PROTOCOLS": "base2new", "DATASETS": "dtd", "SEEDS": "1", "CONFIGS": f"--config {model}",
        "VLM": f"{sys.executable} -m vlm.runtime.cli",
        "EXTRA_ARGS": "--data.init_args.transforms.image_size 32 --data.init_args.loader.batch_size 2 --data.init_args.loader.num_workers 0",
    })  # fmt: skip
    proc = subprocess.run(["bash", "scripts/slurm/sweep_task.sbatch"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = work / "runs" / "sweep" / "base2new" / "dtd" / "seed1" / "logs"
    rows = list(csv.DictReader((logs / "metrics.csv").open(newline="")))
    assert sum(1 for r in rows if r.get("train/loss")) == 2 and any(r.get("test/acc_base") for r in rows)
    assert {"config_fit.yaml", "config_test.yaml", "hparams.yaml", "results.json"} <= {p.name for p in logs.iterdir()}
    results = json.loads((logs / "results.json").read_text())
    assert set(results["metrics"]) == {"test/acc_base", "test/acc_new", "test/hm"} and results["seed"] == 1
    assert Path(results["checkpoint"]["ckpt_path"]).parent == logs / "checkpoints", "absolute, though the script's is relative"
