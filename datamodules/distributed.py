"""Distributed data helpers: exact (unpadded) evaluation sampling and the current rank/world size.

Lightning gives validation and test loaders a padding `DistributedSampler` under DDP: when the
dataset size is not a multiple of the world size, a few samples are evaluated twice and the
accuracy is slightly off. Evaluation loaders here carry Lightning's own
`UnrepeatedDistributedSampler` instead (Lightning leaves any `DistributedSampler` alone), so every
sample is counted exactly once; ranks may then run one batch apart, which is safe for evaluation
(no collective runs per step; torchmetrics states are summed across ranks at `compute`).
"""

from __future__ import annotations

import os

import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exact_eval_sampler(dataset: Dataset) -> UnrepeatedDistributedSampler | None:
    """An in-order, unpadded per-rank sampler when running distributed with >1 process, else None."""
    rank, world = rank_and_world()
    if world <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


def local_rank_zero() -> bool:
    """True on the first process of a node (before or without a process group), from the launcher's env."""
    return os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
