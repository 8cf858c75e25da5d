"""Issue 24 item 7: a CLI that speaks plainly.

* our own errors print their message and fix without a traceback and exit 1 (`--debug` and
  `VLM_DEBUG=1` show the traceback);
* an unknown key names the key and the nearest valid one, without the usage, the union dump or the
  unrelated list of registered prompt learners;
* no Lightning tips, no FLOPs column of zeros in the model summary, no `v_num` in the progress bar;
* `vlm predict` writes its predictions (class, score, image) into a file in the log folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import write_cli_config
from vlm.runtime.checkpoint_io import CorruptCheckpointError
from vlm.runtime.cli import console, is_user_error, main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(config, log folder, toy data) of a two-step CoOp fit."""
    tmp = tmp_path_factory.mktemp("output")
    toy = make_dataset(tmp / "toy")
    cfg = write_cli_config(tmp, toy, tmp / "run")
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "2"])
    return cfg, tmp / "run" / "v0", toy


def test_our_error_prints_message_and_fix_without_traceback(fitted: tuple[Path, Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cfg, _, _ = fitted
    bad = tmp_path / "empty.ckpt"
    bad.write_bytes(b"")
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    argv = ["test", "--config", str(cfg), "--ckpt_path", str(bad)]
    assert console(argv) == 1
    err = capsys.readouterr().err
    assert f"vlm test: error: CorruptCheckpointError: Checkpoint {bad} is empty (0 bytes)" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(CorruptCheckpointError):
        console([*argv, "--debug"])
    monkeypatch.setenv("VLM_DEBUG", "1")
    with pytest.raises(CorruptCheckpointError):
        console(argv)


def test_a_constructors_own_error_is_shown_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    cfg = write_cli_config(tmp_path, tmp_path / "missing", tmp_path / "run")
    assert console(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "vlm fit: error: FileNotFoundError: Dataset root" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback() -> None:
    try:
        1 / 0
    except ZeroDivisionError as err:
        assert not is_user_error(err)
    try:
        int("x")  # a ValueError raised outside vlm's code
    except ValueError as err:
        assert not is_user_error(err)


@pytest.mark.parametrize(
    "typo,key,guess",
    [
        ("model:\n  init_args:\n    prompt_learner:\n      init_args:\n        n_ctxx: 3\n", "model.init_args.prompt_learner.init_args.n_ctxx", "n_ctx"),
        ("trainer:\n  max_epoch: 3\n", "trainer.max_epoch", "trainer.max_epochs"),
    ],
)
def test_unknown_key_names_the_key_and_the_nearest_valid_one(typo: str, key: str, guess: str, fitted: tuple[Path, Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    cfg, _, _ = fitted
    (tmp_path / "typo.yaml").write_text(typo)
    assert console(["fit", "--config", str(cfg), "--config", str(tmp_path / "typo.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"unknown key '{key}'" in err and f"Did you mean '{guess}'?" in err
    for noise in ("Registered prompt learners", "Does not validate against any of the Union subtypes", "usage:", "--trainer.accelerator"):
        assert noise not in err, noise
    assert len(err.splitlines()) <= 4, err


@pytest.mark.parametrize("flat,grouped", [("batch_size: 4", "loader.batch_size"), ("train_transforms: [normalize]", "transforms.train")])
def test_a_flat_datamodule_key_of_earlier_versions_names_its_new_place(flat: str, grouped: str, fitted: tuple[Path, Path, Path],
                                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``data.init_args.batch_size`` (before the image and loader settings were grouped) is refused
    with the grouped key to write instead, in a few lines."""
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    cfg, _, _ = fitted
    (tmp_path / "old.yaml").write_text(f"data:\n  init_args:\n    {flat}\n")
    assert console(["fit", "--config", str(cfg), "--config", str(tmp_path / "old.yaml")]) == 2
    err = capsys.readouterr().err
    old = flat.split(":")[0]
    assert f"unknown key 'data.init_args.{old}'" in err and f"write 'data.init_args.{grouped}'" in err, err
    assert "Does not validate against any of the Union subtypes" not in err and len(err.splitlines()) <= 4, err


def test_no_tips_no_flops_no_v_num(fitted: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from vlm.runtime.lightning_cli import VLMCLI

    cfg, _, _ = fitted
    args = ["--config", str(cfg), "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "true",
            "--trainer.enable_model_summary", "true", "--trainer.logger.init_args.version", "shown"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        cli = VLMCLI(args=args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    shown = capsys.readouterr()
    text = shown.out + shown.err + caplog.text
    assert "Tip:" not in text and "litmodels" not in text and "litlogger" not in text
    assert "Trainable params" in text and "FLOPs" not in text and "Flops" not in text
    bar = cli.trainer.progress_bar_callback
    assert cli.trainer.logger.version == "shown" and "v_num" not in bar.get_metrics(cli.trainer, cli.model)


def test_predict_writes_class_score_and_image_per_line(fitted: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, log_dir, toy = fitted
    main(["predict", "--config", str(cfg), "--ckpt_path", "last"])
    path = log_dir / "predictions.jsonl"
    assert f"wrote 14 predictions to {path}" in capsys.readouterr().out
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    split = json.loads((toy / "split_zhou_Toy.json").read_text())["test"]
    assert [r["index"] for r in rows] == list(range(len(split))) == list(range(14))
    by_label = {label: name for _, label, name in split}  # test[all]: every class, label order
    for row, (image, _, _) in zip(rows, split):
        assert row["path"] == str(toy / "images" / image) and Path(row["path"]).is_file()
        assert row["class"] == by_label[row["class_index"]]
        assert 0.0 < row["score"] <= 1.0
    main(["predict", "--config", str(cfg), "--ckpt_path", "last"])
    assert (log_dir / "predictions.1.jsonl").is_file() and path.read_text().count("\n") == 14, "a second run does not replace the first"
