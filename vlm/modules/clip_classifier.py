"""CLIP classification with an optional prompt learner (the few-shot / base-to-new protocol).

Class names become text features through the learner's text side (or the frozen template when the
learner does not touch text, in which case features are computed once per class set and cached).
Logits are ``exp(logit_scale) * cos(image, text)``. Base, new and all class sets are evaluated
as separate test dataloaders with their own metrics (``test/acc_base``, ``test/acc_new``,
``test/acc_all``) and the harmonic mean ``test/hm`` of base and new (accuracies in percent).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from vlm.backbones.base import Backbone
from vlm.datamodules.templates import DEFAULT_TEMPLATE
from vlm.datamodules.protocols import ClassificationData, data_of
from vlm.modules.fit_data import serve_fit_requests
from vlm.runtime.links import check_image_size
from vlm.metrics import harmonic_mean
from vlm.modules.hooked import HookedClassifier
from vlm.modules.optim import OptimConfig
from vlm.prompts import PromptLearner
from vlm.protocols import ImageTextBackbone
from vlm.pruning.base import Pruner
from vlm.runtime.paths import ExportDir


class CLIPClassifier(HookedClassifier):
    """Zero-shot or prompt-tuned CLIP classifier.

    Args:
        backbone: the (frozen) CLIP.
        prompt_learner: a registered learner (``vlm.prompts.available()``) or None for zero-shot CLIP.
        classnames: training classes in label order; if None, taken from the datamodule's
            ``classnames`` at setup.
        test_classnames: ``{subset: classnames}`` per test dataloader, in dataloader order; if
            None, taken from the datamodule's ``test_classnames`` at setup.
        template: prompt template for frozen text features (zero-shot and vision-only learners);
            ``None`` takes the datamodule's ``template`` (the CLI links ``data.template`` here), else
            "a photo of a {}.".
        optim: optimiser and schedule.
        init_from: an exported directory (``vlm export``) whose learned tensors are loaded; in a
            config file a relative path is taken from that file's folder (an export's own
            ``config.yaml`` says ``.``, so a copied or moved export loads its own tensors).
        pruner: a visual-token pruner (``vlm.pruning.available()``) run inside the image tower
            after the prompt learner, trading accuracy for speed; None keeps every token.
    """

    no_learner = "zeroshot"
    backbone_protocol = ImageTextBackbone

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: Optional[PromptLearner] = None,
        classnames: Optional[list[str]] = None,
        test_classnames: Optional[dict[str, list[str]]] = None,
        template: Optional[str] = None,
        optim: Optional[OptimConfig] = None,
        init_from: Optional[ExportDir] = None,
        pruner: Optional[Pruner] = None,
    ) -> None:
        super().__init__()
        # template is left out: the datamodule logs its own (Lightning refuses differing duplicates)
        self.save_hyperparameters(ignore=["backbone", "prompt_learner", "optim", "pruner", "template"])
        if prompt_learner is not None and classnames:
            prompt_learner.bind_classes(list(classnames))
        self.attach(backbone, prompt_learner, pruner, optim, init_from)
        self.classnames = list(classnames or [])
        self.test_classnames = dict(test_classnames or {})
        self.template = template or DEFAULT_TEMPLATE
        self._template_given = template is not None
        self._text_cache: dict[tuple[str, ...], Tensor] = {}
        self._frozen_text_cache: dict[tuple[str, ...], Tensor] = {}
        self._sync_test_metrics()
        self.restore()

    def _sync_test_metrics(self) -> None:
        for subset, names in self.test_classnames.items():
            if subset not in self.test_acc:
                self.test_acc[subset] = MulticlassAccuracy(num_classes=max(2, len(names)), average="micro")

    def setup(self, stage: str) -> None:
        data = data_of(self.trainer, ClassificationData)
        check_image_size(self.backbone, self.trainer.datamodule)
        if data is not None:
            if not self._template_given and data.template:
                self.template = data.template
                self._text_cache.clear()
                self._frozen_text_cache.clear()
            self.classnames = self.classnames or list(data.classnames)
            self.test_classnames = self.test_classnames or dict(data.test_classnames)
        self._sync_test_metrics()
        self.test_acc.to(self.device)
        if stage == "test" and self.prompt_learner is not None:
            for names in self.test_classnames.values():
                self.prompt_learner.check_classes(list(names))

    # --- features -----------------------------------------------------------------------------
    def _text_is_frozen(self) -> bool:
        return self.prompt_learner is None or not self.prompt_learner.learns_text

    def class_features(self, classnames: list[str]) -> Tensor:
        """L2-normalised text features ``[C, E]`` of ``classnames``."""
        key = tuple(classnames)
        if self._text_is_frozen() and key in self._text_cache:
            return self._text_cache[key]
        inputs = self.prompt_learner.text_inputs(classnames, self.template) if self.prompt_learner else None
        if inputs is None:
            tokens = self.backbone.tokenize([self.template.format(c.replace("_", " ")) for c in classnames])
            embeds = None
        else:
            tokens, embeds = inputs.tokens, inputs.embeds
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._text_is_frozen()):
            feats = self.backbone.encode_text(tokens.to(self.device), self.hooks, embeds, normalize=True)
        if self._text_is_frozen():
            self._text_cache[key] = feats.detach()
        return feats

    def forward(self, images: Tensor, classnames: Optional[list[str]] = None) -> dict[str, Tensor]:
        classnames = classnames if classnames is not None else self.classnames
        text = self.class_features(classnames)
        image = self.backbone.encode_image(images, self.hooks, normalize=True)
        logits = self.backbone.logit_scale.exp() * image @ text.t()
        return {"logits": logits, "image_features": image, "text_features": text}

    @torch.no_grad()
    def frozen_outputs(self, images: Tensor, classnames: Optional[list[str]] = None) -> dict[str, Tensor]:
        """The zero-shot CLIP pass (no hooks, no grad) for learners with ``needs_frozen_pass``:
        ``frozen_image_features``, ``frozen_text_features`` (the template prompts),
        ``frozen_logits`` (computed exactly as the zero-shot classifier computes its logits), and
        ``frozen_vision_tokens`` ``[B, N, D]`` / ``frozen_vision_types`` ``[B, N]`` (the vision
        tower's tokens after its last block, before its final norm, e.g. for patch saliency)."""
        names = classnames if classnames is not None else self.classnames
        key = tuple(names)
        if key not in self._frozen_text_cache:
            tokens = self.backbone.tokenize([self.template.format(c.replace("_", " ")) for c in names])
            self._frozen_text_cache[key] = self.backbone.encode_text(tokens.to(self.device), [], None, normalize=True)
        text = self._frozen_text_cache[key]
        vision = self.backbone.run_vision(images, [])
        image = F.normalize(vision.pooled, dim=-1)
        return {
            "frozen_image_features": image,
            "frozen_text_features": text,
            "frozen_logits": self.backbone.logit_scale.exp() * image @ text.t(),
            "frozen_vision_tokens": vision.state.x,
            "frozen_vision_types": vision.state.batch_types,
        }

    def on_fit_start(self) -> None:
        if self.prompt_learner is not None:
            dm = getattr(self.trainer, "datamodule", None)
            serve_fit_requests(self.prompt_learner, self.backbone, dm, list(self.classnames), self.device)

    # --- steps --------------------------------------------------------------------------------
    def loss_outputs(self, out: dict[str, Tensor], batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        """Adds the zero-shot pass (:meth:`frozen_outputs`) in training for learners that need it."""
        if stage == "train" and self.prompt_learner is not None and self.prompt_learner.needs_frozen_pass:
            return {**out, **self.frozen_outputs(batch["image"])}
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.supervised_loss(self(batch["image"]), batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.supervised_loss(self(batch["image"]), batch, "val")

    def test_subset(self, dataloader_idx: int) -> str:
        names = list(self.test_classnames)
        if dataloader_idx >= len(names):
            raise ValueError(
                f"Test dataloader {dataloader_idx} has no class list: the model knows subsets {names}. "
                "Link data.test_classnames to model.test_classnames (the default CLI does this)."
            )
        return names[dataloader_idx]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        subset = self.test_subset(dataloader_idx)
        out = self(batch["image"], self.test_classnames[subset])
        # argmax first: learners may append extra (never-correct) columns, e.g. background columns
        self.test_acc[subset].update(out["logits"].argmax(-1), batch["label"])

    def on_test_epoch_end(self) -> None:
        accs = {}
        for subset, metric in self.test_acc.items():
            if metric.update_count == 0:
                continue
            accs[subset] = float(metric.compute()) * 100.0
            self.log(f"test/acc_{subset}", accs[subset], add_dataloader_idx=False)
            metric.reset()
        if "base" in accs and "new" in accs:
            self.log("test/hm", harmonic_mean(accs["base"], accs["new"]), add_dataloader_idx=False)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        subset = "all" if "all" in self.test_classnames else None
        names = self.test_classnames[subset] if subset else self.classnames
        probs = self(batch["image"], names)["logits"].softmax(-1)
        conf, pred = probs.max(-1)
        return {"index": batch.get("index"), "pred": pred, "confidence": conf, "classnames": names}
