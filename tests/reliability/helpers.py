"""Tiny runs for the reliability tests: a tiny CLIP + CoOp on the toy CoOp dataset, on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml

from tests.helpers import data_args, tiny_clip_cfg
from vlm.backbones import ClipBackbone
from vlm.datamodules import FewShotDataModule
from vlm.modules import CLIPClassifier
from vlm.modules.optim import OptimConfig
from vlm.prompts import create


def coop_module(n_ctx: int = 4, seed: int = 0, **kwargs: Any) -> CLIPClassifier:
    """A CoOp classifier on the tiny CLIP (weights from ``seed``)."""
    torch.manual_seed(seed)
    backbone = ClipBackbone("tiny", model_cfg=tiny_clip_cfg())
    learner = kwargs.pop("prompt_learner", None) or create("coop", n_ctx=n_ctx)
    return CLIPClassifier(backbone, learner, optim=OptimConfig(name="sgd", lr=0.05), **kwargs)


def toy_datamodule(root: Path, **kwargs: Any) -> FewShotDataModule:
    """The toy dataset as few-shot base-to-new data at 32 px."""
    args: dict[str, Any] = dict(root=str(root), dataset="Toy", num_shots=2, image_size=32, batch_size=2, eval_batch_size=8)
    args.update(kwargs)
    return FewShotDataModule(**data_args(**args))


def trainer(root: Path, callbacks: Optional[list[L.Callback]] = None, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer writing into ``root``."""
    args: dict[str, Any] = dict(
        accelerator="cpu", devices=1, default_root_dir=str(root), logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks or [],
    )  # fmt: skip
    args.update(kwargs)
    return L.Trainer(**args)


def write_cli_config(tmp: Path, data_root: Path, run_dir: Path, **data: Any) -> Path:
    """One YAML for `vlm fit/test`: tiny CLIP + CoOp, toy data, CSV logs in ``run_dir/v0``."""
    cfg: dict[str, Any] = {
        "seed_everything": 0,
        "model": {
            "class_path": "vlm.modules.CLIPClassifier",
            "init_args": {
                "backbone": {"class_path": "vlm.backbones.ClipBackbone", "init_args": {"model_name": "tiny", "model_cfg": tiny_clip_cfg()}},
                "prompt_learner": {"class_path": "coop", "init_args": {"n_ctx": 4}},
                "optim": {"name": "sgd", "lr": 0.05},
            },
        },
        "data": {
            "class_path": "vlm.datamodules.FewShotDataModule",
            "init_args": data_args(**{"root": str(data_root), "dataset": "Toy", "num_shots": 2, "image_size": 32,
                                      "batch_size": 2, "eval_batch_size": 8, **data}),
        },  # fmt: skip
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "default_root_dir": str(run_dir),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "", "version": "v0"}},
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
