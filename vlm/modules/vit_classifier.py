"""ViT classification with a linear head and an optional visual prompt learner (VPT/TCPA-style)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from vlm.backbones import ClipBackbone, ViTBackbone
from vlm.modules.base import LearnedOnlyModule, accuracy_percent
from vlm.modules.optim import OptimConfig
from vlm.hooks import TowerHook
from vlm.prompts import PromptLearner
from vlm.pruning import TokenPruner
from vlm.reliability import check_hooks


class ViTClassifier(LearnedOnlyModule):
    """Frozen ViT (timm, or a CLIP image tower) + prompts + a trained linear head.

    Args:
        backbone: the frozen ViT.
        num_classes: classes of the head (linked from the datamodule).
        prompt_learner: a vision prompt learner (``vpt``, ``tcpa``, ...) or None (linear probe).
        optim: optimiser and schedule.
        init_from: an exported directory (``vlm export``) whose learned tensors are loaded.
        pruner: a visual-token pruner (``vtc_cls``, ``flowcut``, ...) run inside the image tower
            after the prompt learner, trading accuracy for speed; None keeps every token.
    """

    def __init__(
        self,
        backbone: Union[ViTBackbone, ClipBackbone],
        num_classes: int,
        prompt_learner: Optional[PromptLearner] = None,
        optim: Optional[OptimConfig] = None,
        init_from: Optional[str] = None,
        pruner: Optional[TokenPruner] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "prompt_learner", "optim", "pruner"])
        self.backbone = backbone
        self.prompt_learner = prompt_learner
        self.pruner = pruner
        if prompt_learner is not None:
            prompt_learner.build(backbone)
        check_hooks(backbone, prompt_learner, pruner)
        self.method_name = prompt_learner.name if prompt_learner is not None else "linear"
        dim = backbone.num_features if isinstance(backbone, ViTBackbone) else backbone.embed_dim
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes)
        self.optim = optim or OptimConfig()
        self.test_acc = nn.ModuleDict()
        if init_from:
            self.load_exported(init_from)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is not None and int(n) != self.num_classes:
            raise ValueError(
                f"The data has {n} classes but the head has {self.num_classes}: "
                f"set model.init_args.num_classes={n}."
            )

    @property
    def hooks(self) -> list[TowerHook]:
        """Vision/text hooks in order: the prompt learner, then the pruner (which acts on the
        vision tower only, keeps CLS and prompts, and leaves ``lengths`` right for pooling)."""
        return [h for h in (self.prompt_learner, self.pruner) if h is not None]

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
        out = self(batch["image"])
        ce = F.cross_entropy(out["logits"], batch["label"])
        extra = self.prompt_learner.losses(out, batch) if self.prompt_learner else {}
        self.check_finite({"ce": ce, **extra}, stage)
        loss = ce + sum(extra.values()) if extra else ce
        bs = batch["label"].shape[0]
        for name, value in extra.items():
            self.log(f"{stage}/{name}", value, batch_size=bs)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=bs)
        self.log(f"{stage}/acc", accuracy_percent(out["logits"], batch["label"]), prog_bar=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def _subset_name(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        names = list(getattr(dm, "test_subsets", None) or ["all"])
        if dataloader_idx >= len(names):
            raise ValueError(f"Test dataloader {dataloader_idx} has no name: the datamodule's test_subsets are {names}.")
        return names[dataloader_idx]

    def on_test_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        for name in list(getattr(dm, "test_subsets", None) or ["all"]):
            if name not in self.test_acc:
                self.test_acc[name] = MulticlassAccuracy(num_classes=self.num_classes, average="micro").to(self.device)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_labels(batch["label"])
        name = self._subset_name(dataloader_idx)
        self.test_acc[name].update(self(batch["image"])["logits"], batch["label"])

    def on_test_epoch_end(self) -> None:
        for name, metric in self.test_acc.items():
            self.log(f"test/acc_{name}", float(metric.compute()) * 100.0, add_dataloader_idx=False)
            metric.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self(batch["image"])["logits"].softmax(-1)
        conf, pred = probs.max(-1)
        return {"index": batch.get("index"), "pred": pred, "confidence": conf}
