"""The learning-rate schedules against the released trainers' schedules, lr at every step.

* TCPA (zhoujiahuan1991/ICML2025-TCPA @ dce8b3a): ``train/utils.py`` ``cosine_lr``, called once per
  iteration by ``train/trainer.py`` with ``warmup_length = len(loader) * n_epochs // 5``.
* Dassl (KaiyangZhou/Dassl.pytorch, ``dassl/optim/lr_scheduler.py``): ``ConstantWarmupScheduler``
  around torch's ``CosineAnnealingLR(T_max=MAX_EPOCH)`` (``WARMUP_RECOUNT=True``), stepped at the
  last batch of every epoch: the schedule of CoOp, IVLP, MaPLe, PromptSRC and DAPT.
* VPT (KMnP/vpt ``src/solver/lr_scheduler.py``, also VFPT's): ``WarmupCosineSchedule(warmup_steps=
  WARMUP_EPOCH, t_total=TOTAL_EPOCH)``, stepped after every epoch by ``src/engine/trainer.py``.

Each released schedule is written out below as the plain per-step (or per-epoch) rate its trainer
produces, including Dassl's cosine restarting after the warm-up and VPT's warm-up from 0. Ours runs
through a real Lightning fit of ``LearnedOnlyModule.configure_optimizers`` and the rate each
optimiser step used is recorded.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
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


# --- the released schedules, written out plainly from what each trainer does ------------------
def tcpa_official(base_lr: float, len_loader: int, n_epochs: int) -> list[float]:
    """TCPA's trainer sets the rate before every iteration ``t`` of ``T = len_loader * n_epochs``:
    ``base (t + 1) / W`` while ``t < W = T // 5``, then ``base (1 + cos(pi (t - W) / (T - W))) / 2``."""
    total = len_loader * n_epochs
    warm = total // 5
    return [base_lr * (t + 1) / warm if t < warm else base_lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
            for t in range(total)]


def dassl_official(base_lr: float, cons_lr: float, warmup_epoch: int, max_epoch: int) -> list[float]:
    """Dassl's rate in epoch ``e`` (its scheduler steps once per epoch): ``cons_lr`` for the
    ``warmup_epoch`` warm-up epochs; after them its cosine successor (``T_max = max_epoch``), which
    did not step during the warm-up, starts from its own epoch 0: ``base (1 + cos(pi (e - W) / T)) / 2``."""
    return [cons_lr if e < warmup_epoch else base_lr * 0.5 * (1 + math.cos(math.pi * (e - warmup_epoch) / max_epoch))
            for e in range(max_epoch)]


def vpt_official(base_lr: float, warmup_epoch: int, total_epoch: int) -> list[float]:
    """VPT's rate in epoch ``e`` (stepped once per epoch): ``base e / W`` while ``e < W``, then
    ``base (1 + cos(pi (e - W) / (T - W))) / 2``, never below 0."""
    out = []
    for e in range(total_epoch):
        if e < warmup_epoch:
            out.append(base_lr * e / max(1, warmup_epoch))
        else:
            progress = (e - warmup_epoch) / max(1, total_epoch - warmup_epoch)
            out.append(base_lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress))))
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
