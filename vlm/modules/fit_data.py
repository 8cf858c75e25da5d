"""Serve what a prompt learner declared it needs from the data before fit (``fit_requests``).

The learner never reads a datamodule: the module answers each typed request
(:class:`~vlm.prompts.base.TrainShotFeatures`) with the frozen backbone's features of the
training shots, and hands the answer to the learner's ``receive``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlm.datamodules.protocols import ShotData

from vlm.prompts.base import PromptLearner, ShotFeatures, TrainShotFeatures


def shot_loader(datamodule: Any, request: TrainShotFeatures) -> Any:
    """The training shots: with the test transform (un-augmented), or the training loader as is."""
    datamodule.setup("fit")
    if request.transform == "train":
        return datamodule.train_dataloader()
    from vlm.datamodules.image_list import ImageListDataset
    from vlm.datamodules.settings import test_transform

    if not isinstance(datamodule, ShotData) or not hasattr(datamodule.train_set, "items"):
        raise TypeError(
            f"{type(datamodule).__name__} has no train_set.items: TrainShotFeatures(transform='test') needs a "
            "few-shot datamodule (datamodules.protocols.ShotData, e.g. FewShotDataModule); use transform='train' "
            "to read the training loader instead."
        )
    tf = test_transform(datamodule.transforms)
    train = datamodule.train_set
    return DataLoader(ImageListDataset(train.items, tf, name="train-shot-features"), batch_size=datamodule.loader.eval_batch_size)


@torch.no_grad()
def train_shot_features(backbone: nn.Module, loader: Any, classnames: list[str], device: torch.device) -> ShotFeatures:
    """L2-normalised frozen image features (no hooks) and labels of every batch of ``loader``."""
    feats, labels = [], []
    for batch in loader:
        feats.append(backbone.encode_image(batch["image"].to(device), [], normalize=True))
        labels.append(batch["label"].to(device))
    return ShotFeatures(torch.cat(feats), torch.cat(labels), list(classnames))


def serve_fit_requests(learner: PromptLearner, backbone: nn.Module, datamodule: Any, classnames: list[str], device: torch.device) -> None:
    """Answer each of ``learner.fit_requests()`` through ``learner.receive``."""
    for request in learner.fit_requests():
        if not isinstance(request, TrainShotFeatures):
            raise TypeError(f"{type(learner).__name__} requested {request!r}, which no module serves.")
        if datamodule is None:
            raise RuntimeError(f"{type(learner).__name__} needs the training data before fit; run it through a Trainer with a datamodule.")
        learner.receive(request, train_shot_features(backbone, shot_loader(datamodule, request), classnames, device))
