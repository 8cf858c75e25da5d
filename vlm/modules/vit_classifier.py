"""ViT classification with a linear head and an optional visual prompt learner (prompts in the image tower).

The head scores the classes it was trained on, in their training label order. A test subset whose
labels mean other classes (base-to-new's "new" classes, relabelled from 0) cannot be scored by it:
such subsets are skipped with a warning and listed in ``results.json`` (``model.skipped_subsets``),
never reported as an accuracy.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from vlm.backbones.base import Backbone
from vlm.datamodules.protocols import ClassificationData, data_of
from vlm.runtime.links import check_image_size
from vlm.runtime.paths import ExportDir
from vlm.modules.hooked import HookedClassifier
from vlm.modules.optim import OptimConfig
from vlm.prompts import PromptLearner
from vlm.pruning.base import Pruner


class ViTClassifier(HookedClassifier):
    """Frozen ViT (timm, or a CLIP image tower) + prompts + a trained linear head.

    Args:
        backbone: the frozen ViT.
        num_classes: classes of the head (linked from the datamodule).
        prompt_learner: a vision prompt learner (``vlm.prompts.available()``) or None (linear probe).
        optim: optimiser and schedule.
        init_from: an exported directory (``vlm export``) whose learned tensors are loaded; in a
            config file a relative path is taken from that file's folder (an export's own
            ``config.yaml`` says ``.``, so a copied or moved export loads its own tensors).
        pruner: a visual-token pruner (``vlm.pruning.available()``) run inside the image tower
            after the prompt learner, trading accuracy for speed; None keeps every token.
    """

    no_learner = "linear"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        prompt_learner: Optional[PromptLearner] = None,
        optim: Optional[OptimConfig] = None,
        init_from: Optional[ExportDir] = None,
        pruner: Optional[Pruner] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "prompt_learner", "optim", "pruner"])
        self.attach(backbone, prompt_learner, pruner, optim, init_from)
        dim = backbone.feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes)
        self.skipped_subsets: dict[str, str] = {}
        self.restore()

    def setup(self, stage: str) -> None:
        data = data_of(self.trainer, ClassificationData)
        check_image_size(self.backbone, self.trainer.datamodule)
        n = data.num_classes if data is not None else None
        if n is not None and int(n) != self.num_classes:
            raise ValueError(
                f"The data has {n} classes but the head has {self.num_classes}: "
                f"set model.init_args.num_classes={n}."
            )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.backbone.encode_image(images, self.hooks)
        return {"logits": self.head(feats), "image_features": feats}

    def _check_labels(self, labels: Tensor) -> None:
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"Label {int(labels.max())} is out of range for a head of {self.num_classes} classes: "
                "set model.num_classes to the dataset's class count (the CLI links data.num_classes)."
            )

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        self._check_labels(batch["label"])
        return self.supervised_loss(self(batch["image"]), batch, stage)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def _test_subsets(self) -> list[str]:
        """The datamodule's test subsets in loader order (``["all"]`` for other data)."""
        data = data_of(self.trainer, ClassificationData)
        return list(data.test_subsets) if data is not None and data.test_subsets else ["all"]

    def _subset_name(self, dataloader_idx: int) -> str:
        names = self._test_subsets()
        if dataloader_idx >= len(names):
            raise ValueError(f"Test dataloader {dataloader_idx} has no name: the datamodule's test_subsets are {names}.")
        return names[dataloader_idx]

    def on_test_epoch_start(self) -> None:
        self.skipped_subsets = unscorable_subsets(data_of(self.trainer, ClassificationData))
        for name, why in self.skipped_subsets.items():
            rank_zero_warn(f"ViTClassifier: test subset {name!r} is skipped, not scored: {why}")
        for name in self._test_subsets():
            if name not in self.test_acc and name not in self.skipped_subsets:
                self.test_acc[name] = MulticlassAccuracy(num_classes=self.num_classes, average="micro").to(self.device)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self._subset_name(dataloader_idx)
        if name in self.skipped_subsets:
            return
        self._check_labels(batch["label"])
        self.test_acc[name].update(self(batch["image"])["logits"], batch["label"])

    def on_test_epoch_end(self) -> None:
        for name, metric in self.test_acc.items():
            if metric.update_count == 0:
                continue
            self.log(f"test/acc_{name}", float(metric.compute()) * 100.0, add_dataloader_idx=False)
            metric.reset()

    def result_extras(self) -> dict[str, Any]:
        """Recorded in results.json under ``model``: the test subsets that were not scored, and why."""
        return {"skipped_subsets": dict(self.skipped_subsets)} if self.skipped_subsets else {}

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self(batch["image"])["logits"].softmax(-1)
        conf, pred = probs.max(-1)
        return {"index": batch.get("index"), "pred": pred, "confidence": conf}


def unscorable_subsets(data: Optional[ClassificationData]) -> dict[str, str]:
    """``{subset: reason}`` for the data's test subsets whose label ``i`` is not training class ``i``
    (their class list is not a prefix of the training classes), which a linear head cannot score."""
    if data is None:
        return {}
    train, tests = list(data.classnames), dict(data.test_classnames)
    out = {}
    for name, names in tests.items():
        if train and list(names) != train[: len(names)]:
            out[name] = (
                f"its {len(names)} classes (e.g. {list(names)[:3]}) are not the head's training classes "
                f"({len(train)}, e.g. {train[:3]}) in their label order, so the base-class head cannot name them. "
                "Test ViTClassifier on the subsets it was trained on (data.init_args.test_subsets), or use "
                "CLIPClassifier, whose text features cover new classes."
            )
    return out
