"""Optimiser and schedule of the CoOp family (Dassl): SGD, cosine over epochs, constant warm-up."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimisation settings shared by the classifiers.

    Attributes:
        name: ``sgd`` (momentum) or ``adamw``.
        lr: peak learning rate (CoOp: 0.002).
        weight_decay: L2 / decoupled weight decay (CoOp: 5e-4).
        momentum: SGD momentum (0.9).
        warmup_epochs: epochs at the constant ``warmup_lr`` before the cosine schedule (Dassl's
            ``ConstantWarmupScheduler``; CoOp: 1 epoch at 1e-5).
        warmup_lr: learning rate during warm-up.
    """

    name: str = "sgd"
    lr: float = 0.002
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("Nothing to train: the model has no parameters with requires_grad=True.")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"Unknown optimizer {cfg.name!r}; use 'sgd' or 'adamw'.")


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch schedule: ``warmup_lr`` for the first ``warmup_epochs``, then the cosine curve
    ``0.5 lr (1 + cos(pi e / max_epochs))`` at epoch index e (T_max = max_epochs, as in Dassl)."""
    max_epochs = max(1, max_epochs)

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return cfg.warmup_lr / cfg.lr
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max_epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
