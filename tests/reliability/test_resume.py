"""Exact resume: interrupt `fit` after a step, resume from last.ckpt, compare with an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import coop_module, toy_datamodule, trainer
from vlm.checkpoint_io import SafeCheckpointIO
from vlm.preemption import RNGStateCheckpoint

MAX_EPOCHS = 3  # 6 base-class shots, batch 2: 3 steps per epoch, 9 in all


class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Raises before training step ``step`` starts (so the checkpoint of step - 1 is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"interrupted before step {self.step}")


def _run(root: Path, data: Path, interrupt: Optional[int] = None, ckpt_path: Optional[str] = None) -> tuple[torch.Tensor, dict[str, float]]:
    L.seed_everything(0, workers=True)
    module = coop_module()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks: list[L.Callback] = [RNGStateCheckpoint(), checkpoint]
    if interrupt is not None:
        callbacks.append(InterruptAt(interrupt))
    t = trainer(root, callbacks=callbacks, max_epochs=MAX_EPOCHS, deterministic=True, plugins=[SafeCheckpointIO()], limit_val_batches=1)
    dm = toy_datamodule(data)
    if interrupt is not None:
        with pytest.raises(Interrupted):
            t.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module.prompt_learner.ctx.detach().clone(), {}
    t.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert t.global_step == 3 * MAX_EPOCHS
    t.test(module, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("test/")}
    return module.prompt_learner.ctx.detach().clone(), metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, dict[str, float]]:
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "toy")
    ctx, metrics = _run(root / "full", data)
    return data, ctx, metrics


# Epoch boundaries only: Lightning resumes a mid-epoch checkpoint with a fresh train iterator (another
# shuffle, the epoch's first batches again) and its one-batch prefetch has already drawn the next
# batch's augmentation when the checkpoint is written, so mid-epoch resume is not exact (see report).
@pytest.mark.parametrize("step", [3, 6])
def test_interrupt_and_resume_is_bitwise_exact(step: int, reference: tuple, tmp_path: Path) -> None:
    data, ref_ctx, ref_metrics = reference
    _run(tmp_path, data, interrupt=step)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step
    ctx, metrics = _run(tmp_path, data, ckpt_path=str(last))
    assert torch.equal(ctx, ref_ctx), f"resumed after step {step}: max diff {(ctx - ref_ctx).abs().max().item()}"
    assert metrics == ref_metrics
