"""IVLP, MaPLe and DPL train and evaluate base/new through CLIPClassifier on a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.datamodules.toydata import make_dataset
from tests.helpers import short_text_clip
from vlm.datamodules import FewShotDataModule
from vlm.modules import CLIPClassifier
from vlm.modules.optim import OptimConfig
from vlm.prompts import create

LEARNERS = {
    "ivlp": dict(n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2),
    "maple": dict(n_ctx=2, depth=2),
    "dpl": dict(n_ctx_text=2, n_ctx_vision=2, depth_text=1, depth_vision=2),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("toy"))


@pytest.mark.parametrize("name", list(LEARNERS))
def test_fit_then_test_base_and_new(name, toy, tmp_path):
    L.seed_everything(0)
    backbone = short_text_clip(seed=0)
    learner = create(name, **LEARNERS[name])
    model = CLIPClassifier(backbone, learner, optim=OptimConfig(lr=0.05))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert before and all(k.startswith("prompt_learner.") for k in before)
    dm = FewShotDataModule(str(toy), "Toy", num_shots=2, transforms={"image_size": 32}, loader={"batch_size": 4, "eval_batch_size": 8})
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, dm)
    after = model.state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training must move the prompts"
    metrics = trainer.test(model, dm, verbose=False)
    merged = {k: v for m in metrics for k, v in m.items()}
    assert {"test/acc_base", "test/acc_new", "test/hm"} <= set(merged)
    assert all(0.0 <= merged[k] <= 100.0 for k in ("test/acc_base", "test/acc_new", "test/hm"))
