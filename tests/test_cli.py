"""The `vlm` CLI end to end on a tiny CLIP and a tiny CoOp-style dataset (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.datamodules.toydata import make_dataset
from tests.helpers import tiny_clip_cfg
from vlm.runtime.cli import main
from vlm.runtime.identity import CheckpointMismatchError


def _write_configs(tmp: Path, data_root: Path, seed: int = 0) -> list[str]:
    model = {
        "model": {
            "class_path": "vlm.modules.CLIPClassifier",
            "init_args": {
                "backbone": {"class_path": "vlm.backbones.ClipBackbone", "init_args": {"model_name": "tiny", "model_cfg": tiny_clip_cfg()}},
            },
        }
    }
    prompt = {
        "model": {
            "init_args": {
                "prompt_learner": {"class_path": "coop", "init_args": {"n_ctx": 4}},
                "optim": {"name": "sgd", "lr": 0.01},
            }
        }
    }
    data = {
        "data": {
            "class_path": "vlm.datamodules.FewShotDataModule",
            "init_args": {"root": str(data_root), "dataset": "Toy", "num_shots": 2, "transforms": {"image_size": 32},
                          "loader": {"batch_size": 4, "eval_batch_size": 8}},
        }
    }
    trainer = {
        "seed_everything": seed,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "default_root_dir": str(tmp / "run"),
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / "run"), "name": "", "version": "v0"}},
        },
    }
    paths = []
    for name, cfg in (("model", model), ("prompt", prompt), ("data", data), ("trainer", trainer)):
        p = tmp / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        paths += ["--config", str(p)]
    return paths


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "toy")


def test_fit_test_export_roundtrip(tmp_path: Path, toy: Path) -> None:
    cfgs = _write_configs(tmp_path, toy)
    main(["fit", *cfgs])
    ckpts = sorted((tmp_path / "run" / "v0" / "checkpoints").glob("*.ckpt"))
    assert ckpts, "fit must write a checkpoint"
    import torch

    ck = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert list(ck["state_dict"]) == ["prompt_learner.ctx"], "only the learned tensors go into .ckpt"
    assert ck["vlm"]["method"] == "coop"

    main(["test", *cfgs, "--ckpt_path", str(ckpts[-1])])
    results = json.loads((tmp_path / "run" / "v0" / "results.json").read_text())
    assert set(results["metrics"]) == {"test/acc_base", "test/acc_new", "test/hm"}
    assert results["method"] == "coop" and results["dataset"] == "Toy" and results["seed"] == 0
    assert results["config"] == str(tmp_path / "run" / "v0" / "config_test.yaml") and Path(results["config"]).exists()
    assert (tmp_path / "run" / "v0" / "config_fit.yaml").is_file(), "the test stage must not replace the fit's config"
    assert "torch" in results["versions"]

    out = tmp_path / "export"
    main(["export", "--ckpt", str(ckpts[-1]), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"learned.safetensors", "config.yaml", "classnames.json", "metadata.json", ".vlm-export"}
    # Re-evaluating the export reproduces the test metrics of the run that made it.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["trainer"]["logger"]["init_args"]["version"] = "export_eval"
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    main(["test", "--config", str(out / "config.yaml")])
    again = json.loads((tmp_path / "run" / "export_eval" / "results.json").read_text())
    assert again["metrics"] == pytest.approx(results["metrics"], abs=1e-6)


def test_export_refuses_other_backbone(tmp_path: Path, toy: Path) -> None:
    cfgs = _write_configs(tmp_path, toy)
    main(["fit", *cfgs, "--trainer.max_epochs", "1"])
    ckpt = sorted((tmp_path / "run" / "v0" / "checkpoints").glob("*.ckpt"))[-1]
    out = tmp_path / "export"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    from vlm.backbones import ClipBackbone
    from vlm.modules import CLIPClassifier
    from vlm.prompts import create

    other = ClipBackbone("tiny", model_cfg=tiny_clip_cfg(width=32, head_width=16))
    with pytest.raises(CheckpointMismatchError, match="backbone"):
        CLIPClassifier(other, create("coop", n_ctx=4), init_from=str(out))
    same_backbone_other_method = ClipBackbone("tiny", model_cfg=tiny_clip_cfg())
    with pytest.raises(CheckpointMismatchError, match="method 'vpt'"):
        CLIPClassifier(same_backbone_other_method, create("vpt", num_tokens=2), init_from=str(out))


def test_help_lists_every_subcommand_including_export(capsys: pytest.CaptureFixture[str]) -> None:
    """`vlm --help` lists export beside LightningCLI's own subcommands, and `vlm export --help` is
    the exporter's (its flags), not LightningCLI's."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "export"):
        assert f"\n    {sub} " in listed, sub
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    own = capsys.readouterr().out
    assert "--ckpt" in own and "--overwrite" in own and "--trainer" not in own


def test_export_is_a_plain_subcommand(tmp_path: Path, toy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`vlm export` runs its own parser before (and without) any LightningCLI."""
    cfgs = _write_configs(tmp_path, toy)
    main(["fit", *cfgs, "--trainer.max_epochs", "1"])
    import vlm.runtime.lightning_cli as lightning_cli

    def no_cli(*args: object, **kwargs: object) -> None:
        raise AssertionError("vlm export must not build a LightningCLI")

    monkeypatch.setattr(lightning_cli, "VLMCLI", no_cli)
    ckpt = tmp_path / "run" / "v0" / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    assert "exported to" in capsys.readouterr().out and (tmp_path / "export" / "learned.safetensors").is_file()
    with pytest.raises(SystemExit) as done:
        main(["fitt"])
    assert done.value.code == 2 and "invalid choice: 'fitt'" in capsys.readouterr().err
