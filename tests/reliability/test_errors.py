"""Errors that name the file and the fix (issue 15): damaged checkpoints and exports, malformed
YAML, a constructor's own error, non-contiguous labels, corrupt images found by `prepare.py check
--decode`, and `vlm export` refusing to overwrite an earlier export."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.data.layouts import write_layout
from tests.datamodules.toydata import make_dataset
from tests.e2e.flow import REPO, readme_flow, run
from tests.reliability.helpers import toy_datamodule, write_cli_config
from vlm.runtime.checkpoint_io import CorruptCheckpointError, read_safetensors
from vlm.runtime.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(config, checkpoint, export directory) of a one-step CoOp fit on the toy data."""
    tmp = tmp_path_factory.mktemp("fitted")
    cfg = write_cli_config(tmp, make_dataset(tmp / "toy"), tmp / "run")
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "1"])
    ckpt = next((tmp / "run" / "v0" / "checkpoints").glob("*.ckpt"))
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp / "export")])
    return cfg, ckpt, tmp / "export"


def _damage(src: Path, dst: Path, kind: str) -> Path:
    data = src.read_bytes()
    dst.write_bytes({"empty": b"", "garbage": b"\x13\x37 not a checkpoint " * 40, "truncated": data[: len(data) // 2]}[kind])
    return dst


CKPT_PROBLEMS = {
    "empty": r"is empty \(0 bytes\)",
    "garbage": r"is not a PyTorch checkpoint .*starting with b'PK'",
    "truncated": r"is truncated \(\d+ bytes; the end of its zip archive is missing\)",
}


@pytest.mark.parametrize("kind", list(CKPT_PROBLEMS))
def test_damaged_ckpt_is_named_with_its_fix(kind: str, fitted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`vlm test --ckpt_path`, `vlm fit --ckpt_path` and `vlm export --ckpt` on an empty, foreign or
    truncated .ckpt (torch: a bare EOFError, `KeyError: 101`; export: an IndexError)."""
    cfg, ckpt, _ = fitted
    bad = _damage(ckpt, tmp_path / f"{kind}.ckpt", kind)
    pattern = rf"Checkpoint {bad} {CKPT_PROBLEMS[kind]}"
    for argv in (
        ["test", "--config", str(cfg), "--ckpt_path", str(bad)],
        ["fit", "--config", str(cfg), "--ckpt_path", str(bad)],
        ["export", "--ckpt", str(bad), "--out", str(tmp_path / "out")],
    ):
        with pytest.raises(CorruptCheckpointError, match=pattern) as err:
            main(argv)
        assert "copy it again" in str(err.value) or "written by `vlm fit`" in str(err.value)


SAFETENSORS_PROBLEMS = {
    "empty": r"is empty \(0 bytes\)",
    "garbage": r"is not a safetensors file",
    "truncated": r"is truncated \(\d+ bytes; its header promises more data\)",
}


@pytest.mark.parametrize("kind", list(SAFETENSORS_PROBLEMS))
def test_damaged_export_is_named_with_its_fix(kind: str, fitted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, export = fitted
    copy = shutil.copytree(export, tmp_path / "export")
    weights = copy / "learned.safetensors"
    _damage(export / "learned.safetensors", weights, kind)
    config = (copy / "config.yaml").read_text().replace(str(export), str(copy))
    (copy / "config.yaml").write_text(config)
    with pytest.raises(CorruptCheckpointError, match=rf"{weights} {SAFETENSORS_PROBLEMS[kind]}.*--overwrite"):
        main(["test", "--config", str(copy / "config.yaml")])


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = readme_flow("dtd", tmp_path).commands[0]
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  init_args:\n    optim: {name: sgd, lr: 0.1\ntrainer:\n  max_epochs: 1\n")
    with pytest.raises(SystemExit) as err:
        main([*good, "--config", str(bad)])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert f"Config file '{bad}' is not valid YAML, line 4, column 8: expected ',' or '}}'" in stderr, stderr


@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.init_args.prompt_learner.init_args.n_ctx", "0"], "n_ctx must be >= 1; got 0."),
        (["--data.init_args.num_shots", "-2"], "num_shots must be a whole number >= 0"),
    ],
)
def test_constructor_errors_are_shown_as_themselves(override: list[str], message: str, tmp_path: Path) -> None:
    """A prompt learner's or datamodule's own ValueError, not jsonargparse's "Does not validate
    against any of the Union subtypes" followed by every init argument."""
    with pytest.raises(ValueError) as err:
        run([*readme_flow("dtd", tmp_path).commands[0], *override])
    assert str(err.value).startswith(message)
    assert "Union" not in str(err.value) and "validate" not in str(err.value)


def _relabel(split_file: Path, old: int, new: int) -> None:
    split = json.loads(split_file.read_text())
    for items in split.values():
        for item in items:
            item[1] = new if item[1] == old else item[1]
    split_file.write_text(json.dumps(split))


def test_non_contiguous_labels_are_named_as_such(tmp_path: Path) -> None:
    """Labels 0, 1, 3 (no 2): an error saying so, for the registry datasets (which used to invent
    an imageless class "class_2") and for the plain split-file datamodule."""
    flow = readme_flow("dtd", tmp_path)
    _relabel(tmp_path / "data" / "split_zhou_DescribableTextures.json", 2, 3)
    with pytest.raises(ValueError, match=r"labels are not contiguous: 1 of 0\.\.3 never occur \(\[2\]\).*renumber"):
        run(flow.commands[0])
    toy = make_dataset(tmp_path / "toy")
    _relabel(toy / "split_zhou_Toy.json", 2, 5)
    with pytest.raises(ValueError, match=r"train labels are not contiguous.*missing \[2\]"):
        toy_datamodule(toy)


def _prepare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlm_prepare_errors", REPO / "scripts" / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_check_decode_finds_corrupt_images(workers: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check` alone only sees that the files exist; `check --decode` decodes each one and names
    the corrupt ones (here a truncated JPEG and a text file named .jpg), exiting 1."""
    root = tmp_path / "dtd"
    write_layout("dtd", root)
    images = sorted((root / "images").rglob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:40])
    images[-1].write_text("not an image")
    prepare = _prepare()
    args = ["check", "--dataset", "dtd", "--root", str(root)]
    assert prepare.main(args) == 0
    capsys.readouterr()
    assert prepare.main([*args, "--decode", "--workers", str(workers)]) == 1
    err = capsys.readouterr().err
    assert f"2 of {len(images)} images do not decode" in err
    assert f"'{images[0]}'" in err and f"'{images[-1]}'" in err and "on_corrupt=skip" in err


def test_export_refuses_to_overwrite_an_earlier_export(fitted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, ckpt, export = fitted
    out = shutil.copytree(export, tmp_path / "export")
    tensors, meta = read_safetensors(out / "learned.safetensors")
    before = ({k: v.clone() for k, v in tensors.items()}, meta)  # own memory: the file is overwritten below
    (out / "learned.safetensors").write_bytes(b"another run's weights")
    with pytest.raises(FileExistsError, match=rf"{out} already holds an export \(classnames.json, config.yaml, learned.safetensors, metadata.json\).*--overwrite"):
        main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert (out / "learned.safetensors").read_bytes() == b"another run's weights", "nothing was replaced"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"])
    # same tensors and metadata (safetensors writes its metadata map in no fixed order, so not the same bytes)
    tensors, meta = read_safetensors(out / "learned.safetensors")
    assert meta == before[1] and tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)
