"""Exports are self-contained (issue 24): the one path inside an export, `init_from`, is relative to
the export, so a copy or a moved export tests its own tensors and deleting the original breaks
nothing; and `vlm export` never writes into a folder that is not an export, `--overwrite` or not.

Before: `config.yaml` held the original's absolute path, so a copy tested the original's tensors
(and failed with "learned.safetensors is missing" once the original was gone), a moved export
failed the same way, and `--overwrite` replaced a user's own `config.yaml`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import write_cli_config
from vlm.runtime.cli import main
from vlm.runtime.export import MARKER, ExportFolderError
from vlm.runtime.hashing import sha256_file


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of a one-step CoOp fit of the tiny CLIP on the toy data."""
    tmp = tmp_path_factory.mktemp("fitted")
    cfg = write_cli_config(tmp, make_dataset(tmp / "toy"), tmp / "run")
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "1"])
    return next((tmp / "run" / "v0" / "checkpoints").glob("*.ckpt"))


def _test_export(config: Path, version: str) -> dict:
    """`vlm test --config <export>/config.yaml`, logging into its own version folder; its results."""
    main(["test", "--config", str(config), "--trainer.logger.init_args.version", version])
    save_dir = Path(yaml.safe_load(Path(config).read_text())["trainer"]["logger"]["init_args"]["save_dir"])
    return json.loads((save_dir / version / "results.json").read_text())


def test_a_copy_tests_its_own_tensors_after_the_original_is_deleted(ckpt: Path, tmp_path: Path) -> None:
    original = tmp_path / "original"
    main(["export", "--ckpt", str(ckpt), "--out", str(original)])
    assert yaml.safe_load((original / "config.yaml").read_text())["model"]["init_args"]["init_from"] == "."
    assert (original / MARKER).is_file()
    before = _test_export(original / "config.yaml", "original")
    assert before["checkpoint"]["init_from"] == str(original)

    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    shutil.rmtree(original)
    after = _test_export(copy / "config.yaml", "copy")
    assert after["checkpoint"]["init_from"] == str(copy), "the copy must test its own tensors"
    assert after["checkpoint"]["init_from_sha256"] == sha256_file(copy / "learned.safetensors") == before["checkpoint"]["init_from_sha256"]
    assert after["metrics"] == before["metrics"]
    resolved = yaml.safe_load(Path(after["config"]).read_text())  # the run's own record: absolute, re-runnable
    assert resolved["model"]["init_args"]["init_from"] == str(copy)


def test_a_moved_export_works_from_any_working_directory(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Moved, and tested with a relative `--config` from another folder: `init_from: .` is read from
    the config file's folder, not the working directory."""
    first = tmp_path / "first"
    main(["export", "--ckpt", str(ckpt), "--out", str(first)])
    before = _test_export(first / "config.yaml", "first")
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.move(str(first), str(tmp_path / "elsewhere" / "moved")))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    after = _test_export(Path(os.path.relpath(moved / "config.yaml", elsewhere)), "moved")
    assert after["checkpoint"]["init_from"] == str(moved)
    assert after["metrics"] == before["metrics"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_refuses_a_folder_that_is_not_an_export(overwrite: bool, ckpt: Path, tmp_path: Path) -> None:
    """A folder with a user's own config.yaml (and no export marker) is refused, `--overwrite` or not,
    with an error naming the folder and the fix; the user's file is intact."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    argv = ["export", "--ckpt", str(ckpt), "--out", str(mine)] + (["--overwrite"] if overwrite else [])
    with pytest.raises(ExportFolderError, match=rf"--out {mine} is not empty \(config.yaml\) and is not a vlm export .*with or without --overwrite.*Choose a new or empty --out folder"):
        main(argv)
    assert (mine / "config.yaml").read_text() == "my: own config\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"], "nothing was written into the folder"


def test_export_writes_into_an_empty_folder_and_overwrites_only_an_export(ckpt: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    main(["export", "--ckpt", str(ckpt), "--out", str(empty)])
    assert (empty / MARKER).is_file() and (empty / "learned.safetensors").is_file()
    with pytest.raises(ExportFolderError, match=rf"{empty} already holds an export .*--overwrite"):
        main(["export", "--ckpt", str(ckpt), "--out", str(empty)])
    main(["export", "--ckpt", str(ckpt), "--out", str(empty), "--overwrite"])
    with pytest.raises(ExportFolderError, match="is a file, not a folder"):
        main(["export", "--ckpt", str(ckpt), "--out", str(empty / "config.yaml"), "--overwrite"])
