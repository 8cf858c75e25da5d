"""Optimisers and learning-rate schedules of the recipes, as named options.

Two released schedules are covered exactly (closed forms below; ``t`` is the epoch index for
``interval="epoch"`` or the optimiser-step index for ``interval="step"``, ``T`` the number of
epochs or steps of the run, ``W`` the warm-up length in the same unit):

* **Dassl** (the framework of the CLIP prompt learners' released code: ``dassl/optim/lr_scheduler.py``,
  ``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=MAX_EPOCH)`` with the default
  ``WARMUP_RECOUNT=True``, stepped once per epoch): ``warmup="constant"``, ``cosine_over="whole"``,
  ``interval="epoch"``:

      lr(t) = warmup_lr                                  for t < W
      lr(t) = lr * (1 + cos(pi * (t - W) / T)) / 2       for t >= W   (the cosine restarts at W)

* **per-step linear warm-up** (``train/utils.py`` ``cosine_lr`` as called in ``train/trainer.py``,
  once per iteration with ``W = len(loader) * epochs // 5``): ``warmup="linear"``, ``warmup_fraction=0.2``,
  ``cosine_over="remaining"``, ``interval="step"``:

      lr(t) = lr * (t + 1) / W                               for t < W
      lr(t) = lr * (1 + cos(pi * (t - W) / (T - W))) / 2     for t >= W

* **per-epoch warm-up from zero** (``src/solver/lr_scheduler.py`` ``WarmupCosineSchedule(warmup_steps=WARMUP_EPOCH,
  t_total=TOTAL_EPOCH)``, stepped once per epoch by ``src/engine/trainer.py``):
  ``warmup="linear_from_zero"``, ``cosine_over="remaining"``, ``interval="epoch"``: as the previous but
  ``lr(t) = lr * t / W`` during the warm-up (the first epoch trains at 0).

``schedule="constant"`` keeps ``lr`` after the warm-up (meta-tuning recipes with no scheduler).

Which recipe uses which is written in its config (``configs/``), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Literal

import torch
from torch import nn

Schedule = Literal["cosine", "constant"]
Warmup = Literal["constant", "linear", "linear_from_zero"]
CosineOver = Literal["whole", "remaining"]
Interval = Literal["epoch", "step"]


@dataclass
class OptimConfig:
    """Optimisation settings shared by the classifiers.

    Attributes:
        name: ``sgd`` (momentum) or ``adamw``.
        lr: peak learning rate (Dassl's recipes: 0.002).
        weight_decay: L2 / decoupled weight decay (Dassl's recipes: 5e-4).
        momentum: SGD momentum (0.9).
        schedule: ``cosine`` after the warm-up, or ``constant`` (``lr`` throughout).
        interval: advance the schedule once per ``epoch`` (Dassl) or per optimiser ``step`` (``cosine_lr``).
        warmup: ``constant`` (``warmup_lr`` throughout the warm-up, Dassl's), ``linear``
            (``lr * (t + 1) / W``, ``cosine_lr``'s ``_warmup_lr``) or ``linear_from_zero`` (``lr * t / W``,
            ``WarmupCosineSchedule``).
        warmup_epochs: warm-up length in epochs (Dassl's recipes: 1); converted to steps for
            ``interval="step"``.
        warmup_fraction: warm-up length as a share of the run, ``floor(T * fraction)`` (``cosine_lr``'s: 0.2);
            exclusive with ``warmup_epochs``.
        warmup_lr: learning rate of the constant warm-up (Dassl's recipes: 1e-5).
        cosine_over: the cosine's period: the ``whole`` run ``T`` (Dassl, counted from the end of
            the warm-up) or the ``remaining`` ``T - W`` (``cosine_lr``; the cosine then ends at 0).
    """

    name: str = "sgd"
    lr: float = 0.002
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: Schedule = "cosine"
    interval: Interval = "epoch"
    warmup: Warmup = "constant"
    warmup_epochs: float = 0
    warmup_fraction: float = 0.0
    warmup_lr: float = 1e-5
    cosine_over: CosineOver = "whole"

    def __post_init__(self) -> None:
        for field, allowed in (("schedule", Schedule), ("interval", Interval), ("warmup", Warmup), ("cosine_over", CosineOver)):
            if getattr(self, field) not in allowed.__args__:
                raise ValueError(f"OptimConfig.{field} must be one of {allowed.__args__}; got {getattr(self, field)!r}.")
        if self.warmup_epochs < 0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("OptimConfig: warmup_epochs must be >= 0 and warmup_fraction in [0, 1).")
        if self.warmup_epochs and self.warmup_fraction:
            raise ValueError("OptimConfig: set warmup_epochs or warmup_fraction, not both.")


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("Nothing to train: the model has no parameters with requires_grad=True.")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"Unknown optimizer {cfg.name!r}; use 'sgd' or 'adamw'.")


def warmup_length(cfg: OptimConfig, total: int, per_epoch: float) -> int:
    """``W`` in schedule units: ``floor(total * warmup_fraction)`` (exact rational arithmetic, so
    0.2 gives ``cosine_lr``'s ``total // 5``) or ``round(warmup_epochs * per_epoch)``."""
    if cfg.warmup_fraction:
        return math.floor(total * Fraction(str(cfg.warmup_fraction)))
    return int(round(cfg.warmup_epochs * per_epoch))


def lr_at(t: int, total: int, warm: int, cfg: OptimConfig) -> float:
    """The learning rate at schedule index ``t`` of a run of ``total`` units with ``warm`` warm-up units."""
    if t < warm:
        if cfg.warmup == "constant":
            return cfg.warmup_lr
        reached = t + 1 if cfg.warmup == "linear" else t  # cosine_lr counts the current step, WarmupCosineSchedule does not
        return cfg.lr * reached / warm
    if cfg.schedule == "constant":
        return cfg.lr
    period = total - warm if cfg.cosine_over == "remaining" else total
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, period)))


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_epochs: int, total_steps: int) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry for ``cfg``: a LambdaLR over ``lr_at`` (relative to each
    group's base rate) advanced every ``cfg.interval``. ``total_steps`` is used for ``interval="step"``."""
    epochs = max(1, int(max_epochs))
    if cfg.interval == "step":
        total, per_epoch = max(1, int(total_steps)), max(1, int(total_steps)) / epochs
    else:
        total, per_epoch = epochs, 1.0
    warm = warmup_length(cfg, total, per_epoch)

    def factor(t: int) -> float:
        return lr_at(t, total, warm, cfg) / cfg.lr

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": cfg.interval}


def trainer_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, trainer: Any) -> dict[str, Any]:
    """:func:`lr_scheduler` sized from a Lightning trainer (its ``max_epochs`` and, per step,
    ``estimated_stepping_batches``)."""
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    steps = int(trainer.estimated_stepping_batches) if cfg.interval == "step" else max_epochs
    return lr_scheduler(optimizer, cfg, max_epochs, steps)
