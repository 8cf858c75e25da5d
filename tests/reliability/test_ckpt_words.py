"""Issue 24 item 1: `--ckpt_path last` and `best` mean what they say, or are refused.

Before: the default ModelCheckpoint wrote no last.ckpt and Lightning resolved the words against the
new run's own (empty) checkpoint callback, so `vlm test --ckpt_path last` printed "No checkpoint
will be loaded" and scored the untrained prompts (exit 0), and `vlm fit --ckpt_path last` after a
crash started over. Now `vlm fit` writes last.ckpt and vlm resolves the words to a file of this
run (vlm.runtime.checkpoint_words), or stops naming the folders searched and what is there."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import write_cli_config
from vlm.runtime.checkpoint_words import CheckpointNotFoundError, checkpoint_folders
from vlm.runtime.cli import main


def _results(log_dir: Path) -> dict:
    newest = max(log_dir.glob("results*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(newest.read_text())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, log folder) of a two-step CoOp fit with a fixed logger version (run/v0)."""
    tmp = tmp_path_factory.mktemp("words")
    cfg = write_cli_config(tmp, make_dataset(tmp / "toy"), tmp / "run")
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "2"])
    return cfg, tmp / "run" / "v0"


def test_fit_writes_last_ckpt_and_test_last_tests_it(fitted: tuple[Path, Path]) -> None:
    cfg, log_dir = fitted
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the default ModelCheckpoint saves last.ckpt"
    main(["test", "--config", str(cfg), "--ckpt_path", "last"])
    tested = _results(log_dir)["checkpoint"]
    assert tested["ckpt_path"] == str(last) and tested["untrained"] is False


def test_test_last_without_a_checkpoint_is_refused_naming_the_folder(tmp_path: Path) -> None:
    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError, match=r"--ckpt_path last: no last\.ckpt.*Searched: .*run/v0/checkpoints"):
        main(["test", "--config", str(cfg), "--ckpt_path", "last"])
    assert not list((tmp_path / "run").rglob("results*.json")), "nothing was tested"


def test_a_missing_checkpoint_file_is_refused(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, log_dir = fitted
    with pytest.raises(CheckpointNotFoundError, match=r"no such file\. Checkpoints in this run's folders: .*last\.ckpt"):
        main(["test", "--config", str(cfg), "--ckpt_path", str(tmp_path / "nope.ckpt")])


def test_fit_last_resumes_the_previous_version(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default logger (a new version_<n> per run): `fit --ckpt_path last` after an interrupted fit
    resumes from the newest last.ckpt of the earlier versions instead of starting over."""
    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), tmp_path / "run")
    data = yaml.safe_load(cfg.read_text())
    del data["trainer"]["logger"]  # Lightning's default logger: run/lightning_logs/version_<n>
    data["trainer"]["max_epochs"] = 3  # 3 steps each: the interruption is mid-epoch
    cfg.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "2"])  # "killed" after two steps
    first = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(first, map_location="cpu", weights_only=True)["global_step"] == 2
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert f"Restoring states from the checkpoint path at {first}" in caplog.text
    assert "No checkpoint will be loaded" not in caplog.text
    resumed = tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 4


def test_best_without_a_monitored_metric_is_refused(fitted: tuple[Path, Path]) -> None:
    cfg, _ = fitted
    with pytest.raises(CheckpointNotFoundError, match=r"--ckpt_path best: no checkpoint of this run records a best one.*monitor"):
        main(["test", "--config", str(cfg), "--ckpt_path", "best"])


def test_best_is_the_monitored_best_of_the_fit(tmp_path: Path) -> None:
    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), tmp_path / "run")
    monitored = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.monitor=train/loss",
        "--trainer.callbacks.save_top_k=1", "--trainer.callbacks.every_n_train_steps=1",
    ]  # fmt: skip
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", *monitored])
    ckpts = list((tmp_path / "run" / "v0" / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1, ckpts  # top-1 by train/loss
    main(["test", "--config", str(cfg), "--ckpt_path", "best", *monitored])
    assert _results(tmp_path / "run" / "v0")["checkpoint"]["ckpt_path"] == str(ckpts[0])


def test_last_of_another_run_in_the_folder_is_not_used(fitted: tuple[Path, Path]) -> None:
    """A folder shared by experiments: another method's last.ckpt is not this run's last."""
    cfg, _ = fitted
    other = ["--model.init_args.prompt_learner", "vpt", "--model.init_args.prompt_learner.init_args.num_tokens", "2"]
    with pytest.raises(CheckpointNotFoundError, match=r"Checkpoints of other runs .*last\.ckpt"):
        main(["test", "--config", str(cfg), *other, "--ckpt_path", "last"])


def test_checkpoint_folders_follow_the_logger(tmp_path: Path) -> None:
    (tmp_path / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "lightning_logs" / "version_3" / "checkpoints").mkdir(parents=True)
    trainer = {"default_root_dir": str(tmp_path)}
    assert checkpoint_folders({"trainer": trainer}) == [
        tmp_path / "lightning_logs" / "version_0" / "checkpoints", tmp_path / "lightning_logs" / "version_3" / "checkpoints", tmp_path,
    ]  # fmt: skip
    assert checkpoint_folders({"trainer": {**trainer, "logger": False}}) == [tmp_path / "checkpoints", tmp_path]
    fixed = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "s"), "name": "", "version": 7}}
    assert checkpoint_folders({"trainer": {**trainer, "logger": fixed}})[0] == tmp_path / "s" / "version_7" / "checkpoints"
    dirpath = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ck")}}
    assert checkpoint_folders({"trainer": {**trainer, "logger": False, "callbacks": [dirpath]}})[0] == tmp_path / "ck"
