"""Logs are never deleted: with a fixed logger version (scripts/slurm/slurm_trainer.yaml, so a
requeued job keeps its folder) a `vlm test` after `fit`, or the fit run again as a requeue does,
adds to metrics.csv and writes its own config and hparams files. Lightning's CSVLogger deleted
metrics.csv and the fit's config.yaml was overwritten by the test's (10 lines -> 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.datamodules.toydata import make_dataset
from tests.distributed.helpers import REPO
from tests.reliability.helpers import write_cli_config
from vlm.runtime.cli import main


def _slurm_logger(save_dir: Path) -> dict:
    """The logger section of the shipped SLURM trainer config, writing under ``save_dir``."""
    logger = yaml.safe_load((REPO / "scripts" / "slurm" / "slurm_trainer.yaml").read_text())["trainer"]["logger"]
    logger["init_args"]["save_dir"] = str(save_dir)
    return logger


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("logger", ["slurm_trainer.yaml", "plain CSVLogger"])
def test_fixed_version_logs_survive_test_and_requeue(logger: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), run)  # CSVLogger, fixed version "v0"
    if logger == "slurm_trainer.yaml":
        data = yaml.safe_load(cfg.read_text())
        data["trainer"]["logger"] = _slurm_logger(run)
        cfg.write_text(yaml.safe_dump(data))
    log_dir = run / ("logs" if logger == "slurm_trainer.yaml" else "v0")
    fit = ["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]

    main(fit)
    fit_rows = _rows(log_dir / "metrics.csv")
    assert [r["train/loss"] != "" for r in fit_rows].count(True) == 2
    fit_config = (log_dir / "config_fit.yaml").read_bytes()
    fit_hparams = (log_dir / "hparams.yaml").read_bytes()

    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    rows = _rows(log_dir / "metrics.csv")
    assert [{k: r.get(k, "") for k in fit_rows[0]} for r in rows[: len(fit_rows)]] == fit_rows, "the fit's rows are kept"
    assert any(r.get("test/acc_base") for r in rows[len(fit_rows) :]), "the test's rows are appended"
    assert (log_dir / "config_fit.yaml").read_bytes() == fit_config
    assert (log_dir / "config_test.yaml").is_file() and (log_dir / "hparams.yaml").read_bytes() == fit_hparams
    assert (log_dir / "hparams.1.yaml").is_file()
    assert json.loads((log_dir / "results.json").read_text())["config"] == str(log_dir / "config_test.yaml")

    main(fit)  # the same command again: a requeued job
    again = _rows(log_dir / "metrics.csv")
    assert len(again) > len(rows) and [{k: r.get(k, "") for k in fit_rows[0]} for r in again[: len(fit_rows)]] == fit_rows
    assert (log_dir / "config_fit.yaml").read_bytes() == fit_config and (log_dir / "config_fit.1.yaml").is_file()


@pytest.mark.parametrize("logger", ["logger: false", "slurm_trainer.yaml"])
def test_two_tests_in_one_folder_keep_both_results(logger: str, tmp_path: Path) -> None:
    """Issue 24: the LLaVA configs run with `logger: false`, so every `vlm test` writes into
    `default_root_dir`, and the SLURM config's logger has a fixed version: a second test in the same
    folder replaced the first one's results.json while its config got a new name. Now the results
    are numbered as the configs are (results.json, results.1.json), each citing its own config."""
    run = tmp_path / "run"
    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), run)
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["logger"] = False if logger == "logger: false" else _slurm_logger(run)
    cfg.write_text(yaml.safe_dump(data))
    log_dir = run if logger == "logger: false" else run / "logs"
    for seed in (3, 4):  # two tests told apart by their seed (the initial prompts: no checkpoint needed)
        main(["test", "--config", str(cfg), "--allow_untrained", "true", "--seed_everything", str(seed)])
    first, second = (json.loads((log_dir / name).read_text()) for name in ("results.json", "results.1.json"))
    assert (first["seed"], second["seed"]) == (3, 4), "the first test's results were replaced"
    assert first["config"] == str(log_dir / "config_test.yaml") and second["config"] == str(log_dir / "config_test.1.yaml")
    assert set(first["metrics"]) == set(second["metrics"]) == {"test/acc_base", "test/acc_new", "test/hm"}
    assert sorted(p.name for p in log_dir.glob("*results*")) == ["results.1.json", "results.json"], "no temporary file is left"
