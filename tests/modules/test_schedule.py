"""The learning-rate schedules against transcriptions of the released trainers, lr at every step.

* TCPA (zhoujiahuan1991/ICML2025-TCPA @ dce8b3a): ``train/utils.py`` ``cosine_lr``, called once per
  iteration by ``train/trainer.py`` with ``warmup_length = len(loader) * n_epochs // 5``.
* Dassl (KaiyangZhou/Dassl.pytorch, ``dassl/optim/lr_scheduler.py``): ``ConstantWarmupScheduler``
  around torch's ``CosineAnnealingLR(T_max=MAX_EPOCH)`` (``WARMUP_RECOUNT=True``), stepped at the
  last batch of every epoch: the schedule of CoOp, IVLP, MaPLe, PromptSRC and DAPT.
* VPT (KMnP/vpt ``src/solver/lr_scheduler.py``, also VFPT's): ``WarmupCosineSchedule(warmup_steps=
  WARMUP_EPOCH, t_total=TOTAL_EPOCH)``, stepped after every epoch by ``src/engine/trainer.py``.

The released scheduler classes are copied below (only the deprecated ``verbose`` argument is
dropped) and driven the way their trainers drive them. Ours runs through a real Lightning fit of
``LearnedOnlyModule.configure_optimizers`` and the rate each optimiser step used is recorded.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, _LRScheduler
from torch.utils.data import DataLoader, TensorDataset

from vlm.modules.base import LearnedOnlyModule
from vlm.modules.optim import OptimConfig


class Tiny(LearnedOnlyModule):
    def __init__(self, optim: OptimConfig) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.optim = optim

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_lrs(optim: OptimConfig, batches_per_epoch: int, epochs: int) -> list[float]:
    data = DataLoader(TensorDataset(torch.randn(batches_per_epoch, 2)), batch_size=1)
    rec = RecordLR()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[rec],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(optim), train_dataloaders=data)
    return rec.lrs


# --- TCPA: train/utils.py, verbatim ------------------------------------------------------------
def assign_learning_rate(optimizer, new_lr):
    for param_group in optimizer.param_groups:
        param_group["lr"] = new_lr


def _warmup_lr(base_lr, warmup_length, step):
    return base_lr * (step + 1) / warmup_length


def cosine_lr(optimizer, base_lr, warmup_length, steps):
    def _lr_adjuster(step):
        if step < warmup_length:
            lr = _warmup_lr(base_lr, warmup_length, step)
        else:
            e = step - warmup_length
            es = steps - warmup_length
            lr = 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr
        assign_learning_rate(optimizer, lr)
        return lr

    return _lr_adjuster


def tcpa_official(base_lr: float, len_loader: int, n_epochs: int) -> list[float]:
    """The rate of every iteration, driven as ``train/trainer.py`` does (``scheduler(global_step)``
    before each step)."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = cosine_lr(opt, base_lr, len_loader * n_epochs // 5, len_loader * n_epochs)
    out = []
    for epoch in range(n_epochs):
        for i in range(len_loader):
            scheduler(len_loader * epoch + i)
            out.append(opt.param_groups[0]["lr"])
    return out


# --- Dassl: dassl/optim/lr_scheduler.py, verbatim (less ``verbose``) ----------------------------
class _BaseWarmupScheduler(_LRScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        raise NotImplementedError

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def dassl_official(base_lr: float, cons_lr: float, warmup_epoch: int, max_epoch: int) -> list[float]:
    """The rate of every epoch under Dassl's ``build_lr_scheduler`` (cosine, constant warm-up),
    stepped once per epoch (``update_lr`` at the last batch)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(max_epoch))
    if warmup_epoch > 0:
        scheduler = ConstantWarmupScheduler(opt, scheduler, warmup_epoch, cons_lr)
    out = []
    for _ in range(max_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op that keeps torch's step-order check quiet
        scheduler.step()
    return out


# --- VPT / VFPT: src/solver/lr_scheduler.py, verbatim ------------------------------------------
class WarmupCosineSchedule(LambdaLR):
    def __init__(self, optimizer, warmup_steps, t_total, cycles=0.5, last_epoch=-1):
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        self.cycles = cycles
        super(WarmupCosineSchedule, self).__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1.0, self.warmup_steps))
        progress = float(step - self.warmup_steps) / float(max(1, self.t_total - self.warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(self.cycles) * 2.0 * progress)))


def vpt_official(base_lr: float, warmup_epoch: int, total_epoch: int) -> list[float]:
    """The rate of every epoch, ``scheduler.step()`` after each epoch as VPT's trainer does."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = WarmupCosineSchedule(opt, warmup_epoch, total_epoch)
    out = []
    for _ in range(total_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


TCPA = dict(name="adamw", lr=0.005, weight_decay=0.1, warmup="linear", warmup_fraction=0.2, cosine_over="remaining", interval="step")
DASSL = dict(name="sgd", lr=0.0035, warmup="constant", warmup_lr=1e-5, cosine_over="whole", interval="epoch")
VPT = dict(name="sgd", lr=0.25, warmup="linear_from_zero", cosine_over="remaining", interval="epoch")


@pytest.mark.parametrize("batches,epochs", [(3, 10), (7, 4), (5, 3)])
def test_tcpa_schedule_is_the_released_one(batches, epochs):
    got = fit_lrs(OptimConfig(**TCPA), batches, epochs)
    want = tcpa_official(0.005, batches, epochs)
    assert len(got) == len(want) == batches * epochs
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    warm = batches * epochs // 5
    assert got[warm - 1] == pytest.approx(0.005) and got[warm] == pytest.approx(0.005)  # full rate at both ends of the seam


@pytest.mark.parametrize("warmup_epochs,epochs", [(1, 5), (1, 2), (2, 6), (0, 4)])
def test_dassl_schedule_is_the_released_one(warmup_epochs, epochs):
    got = fit_lrs(OptimConfig(**DASSL, warmup_epochs=warmup_epochs), batches_per_epoch=2, epochs=epochs)
    per_epoch = got[::2]
    assert got[1::2] == per_epoch  # stepped once per epoch
    assert per_epoch == pytest.approx(dassl_official(0.0035, 1e-5, warmup_epochs, epochs), rel=1e-12, abs=0)


@pytest.mark.parametrize("warmup_epochs,epochs", [(10, 14), (2, 5), (3, 3)])
def test_vpt_schedule_is_the_released_one(warmup_epochs, epochs):
    got = fit_lrs(OptimConfig(**VPT, warmup_epochs=warmup_epochs), batches_per_epoch=2, epochs=epochs)
    per_epoch = got[::2]
    assert got[1::2] == per_epoch
    assert per_epoch == pytest.approx(vpt_official(0.25, warmup_epochs, epochs), rel=1e-12, abs=1e-15)
    assert per_epoch[0] == 0.0  # VPT's warm-up starts at 0, TCPA's at lr / W


def test_the_options_differ_where_the_released_schedules_do():
    """Each option changes the curve: a wrong option in a recipe cannot pass the tests above."""
    ref = fit_lrs(OptimConfig(**TCPA), 5, 4)
    for change in (dict(warmup="linear_from_zero"), dict(cosine_over="whole"), dict(interval="epoch"),
                   dict(warmup="constant", warmup_lr=1e-5)):
        assert fit_lrs(OptimConfig(**{**TCPA, **change}), 5, 4) != pytest.approx(ref, rel=1e-9)


def test_constant_schedule_and_per_epoch_linear_warmup():
    got = fit_lrs(OptimConfig(name="adamw", lr=0.01, schedule="constant"), batches_per_epoch=2, epochs=3)
    assert got == [0.01] * 6
    got = fit_lrs(OptimConfig(lr=0.01, warmup="linear", warmup_epochs=2, cosine_over="remaining"), batches_per_epoch=1, epochs=5)
    assert got == pytest.approx([0.005, 0.01, 0.01, 0.01 * 0.5 * (1 + math.cos(math.pi / 3)), 0.01 * 0.5 * (1 + math.cos(2 * math.pi / 3))])


def test_invalid_options_are_reported():
    with pytest.raises(ValueError, match="warmup"):
        OptimConfig(warmup_epochs=1, warmup_fraction=0.2)
    with pytest.raises(ValueError, match="cosine_over"):
        OptimConfig(cosine_over="half")
    with pytest.raises(ValueError, match="warmup"):
        OptimConfig(warmup="cosine")
