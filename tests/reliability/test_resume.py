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
from vlm.runtime.checkpoint_io import SafeCheckpointIO
from vlm.runtime.preemption import RNGStateCheckpoint

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


def _run(
    root: Path, data: Path, interrupt: Optional[int] = None, ckpt_path: Optional[str] = None, num_workers: int = 0
) -> tuple[torch.Tensor, dict[str, float]]:
    L.seed_everything(0, workers=True)
    module = coop_module()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks: list[L.Callback] = [RNGStateCheckpoint(), checkpoint]
    if interrupt is not None:
        callbacks.append(InterruptAt(interrupt))
    t = trainer(root, callbacks=callbacks, max_epochs=MAX_EPOCHS, deterministic=True, plugins=[SafeCheckpointIO()], limit_val_batches=1)
    dm = toy_datamodule(data, num_workers=num_workers)  # default train transforms: random crop + flip
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


# Steps 1, 4 and 8 stop inside an epoch (3 steps per epoch), 3 and 6 at its end. Mid-epoch, the training
# loader's state (epoch seed, batches done) comes back with the checkpoint and the resumed epoch skips
# the batches already trained on; augmentation is seeded per sample (datamodules/resumable.py).
@pytest.mark.parametrize("step", [1, 3, 4, 6, 8])
def test_interrupt_and_resume_is_bitwise_exact(step: int, reference: tuple, tmp_path: Path) -> None:
    data, ref_ctx, ref_metrics = reference
    _run(tmp_path, data, interrupt=step)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == step
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == (step - 1) % 3 + 1
    ctx, metrics = _run(tmp_path, data, ckpt_path=str(last))
    assert torch.equal(ctx, ref_ctx), f"resumed after step {step}: max diff {(ctx - ref_ctx).abs().max().item()}"
    assert metrics == ref_metrics


def test_resume_with_workers_equals_the_single_process_run(reference: tuple, tmp_path: Path) -> None:
    """Per-sample seeds make the data independent of ``num_workers``: two loader workers, interrupted
    mid-epoch and resumed, end on the uninterrupted ``num_workers=0`` tensors."""
    data, ref_ctx, ref_metrics = reference
    _run(tmp_path, data, interrupt=5, num_workers=2)
    ctx, metrics = _run(tmp_path, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), num_workers=2)
    assert torch.equal(ctx, ref_ctx)
    assert metrics == ref_metrics
