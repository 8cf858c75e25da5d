"""Issue 21 item 4: the runtime uses Lightning's public seams, and the one exception is pinned.

The exception is ``VLMCLI._parse_ckpt_path`` (vlm.runtime.lightning_cli): LightningCLI has no public
hook between parsing and its merge of a checkpoint's hyper-parameters. If Lightning renames, moves
or stops calling it, the tests here fail before a run silently merges the linked values again.
The rest pins what the public replacements rely on: the ``hpc_ckpt_<N>.ckpt`` name, the SLURM
signal configuration, the CSV logger class named in the config, short names without a fake module.
"""

from __future__ import annotations

import inspect
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import write_cli_config
from vlm.runtime.lightning_cli import VLMCLI
from vlm.runtime.preemption import SigtermCheckpoint, hpc_checkpoint_path

REPO = Path(__file__).resolve().parents[2]
RUNTIME = [*sorted((REPO / "vlm" / "runtime").glob("*.py")), REPO / "vlm" / "registry.py"]


def test_the_only_private_lightningcli_override_is_parse_ckpt_path() -> None:
    private = sorted(
        name for klass in VLMCLI.__mro__ if klass.__module__.startswith("vlm.")
        for name in vars(klass) if name.startswith("_") and not name.startswith("__") and hasattr(LightningCLI, name)
    )  # fmt: skip
    assert private == ["_parse_ckpt_path"]


def test_lightningcli_still_calls_parse_ckpt_path_between_parsing_and_instantiation() -> None:
    """The pin: LightningCLI.__init__ parses, merges the checkpoint's hyper-parameters, then builds."""
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    source = inspect.getsource(LightningCLI.__init__)
    order = [source.find(call) for call in (
        "self.parse_arguments(self.parser, args)", "self._parse_ckpt_path()", "self.before_instantiate_classes()",
        "self.instantiate_classes()",
    )]  # fmt: skip
    assert -1 not in order and order == sorted(order), "LightningCLI changed the calls VLMCLI._parse_ckpt_path relies on"


def test_no_private_lightning_or_jsonargparse_access_in_the_runtime() -> None:
    banned = ("_signal_connector", "_checkpoint_connector", "_subcommands_action", "_slurm_sigusr_handler_fn",
              "__class__ =", "sys.modules[", "sys.modules.setdefault", "def _run_subcommand", "def _add_subcommands",
              "_check_log_dir_exists", "._experiment")  # fmt: skip
    for path in RUNTIME:
        text = path.read_text()
        for word in banned:
            assert word not in text, f"{path.name} uses {word!r}"
        assert not re.search(r"jsonargparse\._[a-z]", text), f"{path.name} imports a private jsonargparse module"
    overrides = [p.name for p in RUNTIME if "def _parse_ckpt_path" in p.read_text()]
    assert overrides == ["lightning_cli.py"]


def test_hpc_checkpoint_name_is_the_one_lightning_writes_and_resumes(tmp_path: Path) -> None:
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    assert hpc_checkpoint_path(tmp_path) == _CheckpointConnector.hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    for n in (1, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    ours = hpc_checkpoint_path(tmp_path)
    assert ours == _CheckpointConnector.hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_4.ckpt")
    Path(ours).write_bytes(b"x")
    resume = _CheckpointConnector(SimpleNamespace(default_root_dir=str(tmp_path)))._hpc_resume_path  # type: ignore[arg-type]
    assert resume == ours, "`--ckpt_path hpc` resumes from the file vlm wrote"


def test_slurm_config_requeues_on_the_signal_the_sbatch_scripts_ask_for() -> None:
    plugin = yaml.safe_load((REPO / "scripts" / "slurm" / "slurm_trainer.yaml").read_text())["trainer"]["plugins"][0]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"] == {"auto_requeue": True, "requeue_signal": "SIGUSR1"}
    for script in ("fit_1node.sbatch", "fit_multinode.sbatch"):
        (asked,) = re.findall(r"^#SBATCH --signal=(\w+)@\d+", (REPO / "scripts" / "slurm" / script).read_text(), re.M)
        assert asked == plugin["init_args"]["requeue_signal"]
    assert inspect.signature(SLURMEnvironment).parameters.keys() >= {"auto_requeue", "requeue_signal"}


def test_requeue_handler_runs_at_the_next_batch_boundary() -> None:
    """The installed requeue handler (Lightning's, under SLURM) is found with signal.getsignal, deferred
    from the signal to the next batch end, run once there, and fit stops with 128 + the signal."""
    calls: list[int] = []
    signum = signal.SIGUSR2
    previous = signal.signal(signum, lambda s, f: calls.append(s))
    try:
        env = SLURMEnvironment(auto_requeue=True, requeue_signal=signum)
        strategy = SimpleNamespace(cluster_environment=env, reduce_boolean_decision=lambda decision, all=True: decision)
        trainer = SimpleNamespace(strategy=strategy)
        callback = SigtermCheckpoint()
        callback.on_train_start(trainer, None)  # type: ignore[arg-type]
        callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
        signal.raise_signal(signum)
        assert calls == [], "nothing happens inside the signal handler"
        with pytest.raises(SIGTERMException) as stop:
            callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert calls == [int(signum)] and stop.value.code == 128 + int(signum)
    finally:
        signal.signal(signum, previous)


def test_short_names_build_the_registered_class_without_a_fake_module(tmp_path: Path) -> None:
    from vlm.prompts.coop import CoOp
    from vlm.runtime.csv_logger import APPENDING_CSV_LOGGER, AppendingCSVLogger

    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), tmp_path / "run")  # class_path: coop, plain CSVLogger
    cli = VLMCLI(args=["--config", str(cfg)], run=False)
    assert type(cli.model.prompt_learner) is CoOp
    assert cli.config.model.init_args.prompt_learner.class_path == "vlm.prompts.coop.CoOp"
    assert not any(name.startswith("vlm.") and name.endswith(".aliases") for name in sys.modules)
    # The plain CSVLogger of the config is built as the appending one, and the config says so.
    assert type(cli.trainer.logger) is AppendingCSVLogger and cli.config.trainer.logger.class_path == APPENDING_CSV_LOGGER


def test_expand_short_names() -> None:
    from vlm.registry import expand_short_names

    cfg = {"model": {"init_args": {"prompt_learner": {"class_path": "coop"}, "pruner": {"class_path": "flowcut"}}},
           "data": {"class_path": "vlm.datamodules.FewShotDataModule"}, "x": [{"class_path": "CLIPClassifier"}, {"class_path": "nope"}]}  # fmt: skip
    out = expand_short_names(cfg)
    assert out["model"]["init_args"]["prompt_learner"]["class_path"] == "vlm.prompts.coop.CoOp"
    assert out["model"]["init_args"]["pruner"]["class_path"] == "vlm.pruning.flowcut.FlowCut"
    assert out["data"] is cfg["data"] and out["x"] == cfg["x"], "other class paths are left to jsonargparse"
    assert cfg["model"]["init_args"]["prompt_learner"]["class_path"] == "coop", "the input is not changed"
