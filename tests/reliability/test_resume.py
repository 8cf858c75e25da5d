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
from vlm.datamodules.resumable import ResumeMismatchError
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
    root: Path, data: Path, interrupt: Optional[int] = None, ckpt_path: Optional[str] = None, num_workers: int = 0,
    **data_args: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    L.seed_everything(0, workers=True)
    module = coop_module()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks: list[L.Callback] = [RNGStateCheckpoint(), checkpoint]
    if interrupt is not None:
        callbacks.append(InterruptAt(interrupt))
    t = trainer(root, callbacks=callbacks, max_epochs=MAX_EPOCHS, deterministic=True, plugins=[SafeCheckpointIO()], limit_val_batches=1)
    dm = toy_datamodule(data, num_workers=num_workers, **data_args)  # default train transforms: random crop + flip
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


# Issue 24: a checkpoint after 2 of the epoch's 3 batches (batch size 2, 2 shots of 3 base classes,
# sampling seed 1), resumed with one data setting changed. Batch size 3 makes the epoch 2 batches long,
# and the old end-of-epoch shortcut (checked with the new count) skipped the epoch's last 2 images
# silently; another sampling seed picks other images for the same 6 places, which the old check
# (batch size, process count, sample count) did not see at all. Each is now refused, named.
@pytest.mark.parametrize(
    "change,expected",
    [
        ({"batch_size": 3}, "data.init_args.loader.batch_size was 2 in the checkpoint and is 3 now"),
        ({"seed": 2}, "data.init_args.seed was 1 in the checkpoint and is 2 now"),
        ({"num_shots": 1}, "data.init_args.num_shots was 2 in the checkpoint and is 1 now"),
    ],
)
def test_mid_epoch_resume_with_other_data_settings_is_refused(change: dict[str, int], expected: str, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "toy")
    _run(tmp_path, data, interrupt=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 2
    with pytest.raises(ResumeMismatchError) as err:
        _run(tmp_path, data, ckpt_path=str(last), **change)
    message = str(err.value)
    assert expected in message and "after batch 2 of 3 of epoch 0" in message, message
    name, value = next(iter(change.items()))
    key = {"batch_size": "loader.batch_size"}.get(name, name)
    assert f"--data.init_args.{key} {dict(batch_size=2, seed=1, num_shots=2)[name]}" in message
