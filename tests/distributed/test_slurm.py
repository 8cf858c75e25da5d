"""SLURM: the sbatch templates' srun command line as Lightning receives it, and SIGUSR1 auto-requeue + resume."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from tests.distributed.helpers import REPO, base_env, run_cli, toy_data, write_config
from vlm.cli import VLMCLI

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
    first = run_cli(tmp_path / "first.json", args, env, extra=["--signal-at-step", "2", "--no-test"])
    assert first["start_step"] == 0 and first["global_step"] == 2
    assert [json.loads(line) for line in record.read_text().splitlines()] == [["requeue", "4242"]]
    ckpt = tmp_path / "job" / "hpc_ckpt_1.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and list(saved["state_dict"]) == ["prompt_learner.ctx"]
    # The requeued job: same command, same folder, no ckpt_path -> resumes from hpc_ckpt_1.ckpt.
    second = run_cli(tmp_path / "second.json", args, env, extra=["--no-test"])
    assert second["start_step"] == 2 and second["global_step"] == 4
    assert second["learned"]["prompt_learner.ctx"] != saved["state_dict"]["prompt_learner.ctx"].double().flatten().tolist()
