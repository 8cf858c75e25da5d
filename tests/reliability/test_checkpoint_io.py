"""Atomic checkpoint writes and weights-only loading (vlm.runtime.checkpoint_io, installed by the CLI)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import write_cli_config
from vlm.runtime.checkpoint_io import SafeCheckpointIO, UnsafeCheckpointError
from vlm.runtime.cli import VLMCLI, main
from vlm.runtime.preemption import RNGStateCheckpoint, SigtermCheckpoint


class Boom(RuntimeError):
    pass


def test_crash_during_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_midway(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f)  # the bytes are written...
        f.truncate(10)  # type: ignore[attr-defined]  # ...partly, and then the process "dies"
        raise Boom("killed during write")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(Boom):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file is left behind"
    kept = io.load_checkpoint(path)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    io.save_checkpoint({"step": 3, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["step"] == 3


class Payload:
    """Stands for a pickled object in a foreign checkpoint."""


def test_loading_is_weights_only_unless_explicitly_trusted(tmp_path: Path) -> None:
    path = tmp_path / "foreign.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {}, "obj": Payload()}, f, pickle_module=pickle)
    io = SafeCheckpointIO()
    with pytest.raises(UnsafeCheckpointError, match=r"weights_only=True.*--weights_only false"):
        io.load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        io.load_checkpoint(path, weights_only=None)
    assert isinstance(io.load_checkpoint(path, weights_only=False)["obj"], Payload)


def _plain(value: object, where: str = "") -> None:
    """Assert that ``value`` is built from plain types only (what weights-only loading accepts)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (str, int, float, bool)), f"{where}: {type(value).__name__}"


def test_cli_checkpoints_are_atomic_weights_only_and_plain(tmp_path: Path) -> None:
    toy = make_dataset(tmp_path / "toy")
    cfg = write_cli_config(tmp_path, toy, tmp_path / "run")
    cli = VLMCLI(args=["--config", str(cfg)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert any(isinstance(c, SigtermCheckpoint) for c in cli.trainer.callbacks)
    assert any(isinstance(c, RNGStateCheckpoint) for c in cli.trainer.callbacks)
    main(["fit", "--config", str(cfg)])
    (ckpt,) = (tmp_path / "run" / "v0" / "checkpoints").glob("epoch=*.ckpt")  # and last.ckpt (save_last)
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    _plain(data["hyper_parameters"], "hyper_parameters")
    _plain(data["datamodule_hyper_parameters"], "datamodule_hyper_parameters")
    _plain(data["vlm"], "vlm")
    # `vlm test --ckpt_path` (and fit resume) read it through SafeCheckpointIO, weights-only.
    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    assert (tmp_path / "run" / "v0" / "results.json").is_file()
