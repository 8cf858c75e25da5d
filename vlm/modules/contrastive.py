"""Image-text contrastive training of a CLIP image tower against a locked, pretrained text tower.

The text transformer stays frozen (its pooled caption features are computed once per
(template, class) and cached); the image tower, the text projection and the logit scale learn.
The loss is CLIP's symmetric InfoNCE with label-aware targets (UniCL, Yang et al. 2022, Eq. 2-3):
in a batch with several captions of the same class, every same-class pair is a positive, so
duplicates are not pushed apart as false negatives:

    L_i2t = -1/B sum_i sum_j T_ij / |P(i)| log softmax_j(s_ij),   T_ij = [y_i == y_j],
    s_ij  = exp(t) <f(x_i), g(c_j)>,  and L = (L_i2t + L_t2i) / 2.

Validation reports zero-shot accuracy with the template ensemble over all classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from vlm.backbones import ClipBackbone
from vlm.datamodules.protocols import CaptionData, data_of
from vlm.modules.base import accuracy_percent


def unicl_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Symmetric contrastive loss with all same-label pairs as positives (``logits [B, B]``)."""
    targets = (labels[:, None] == labels[None, :]).to(logits.dtype)
    i2t = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets / targets.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (i2t + t2i)


class ContrastiveCLIP(L.LightningModule):
    """Locked-text contrastive tuning (the quickstart's "pretraining").

    Args:
        backbone: a CLIP built with ``freeze=False``; its text transformer is locked here.
        classnames: class names (linked from the datamodule's ``classnames`` at setup if None).
        templates: caption templates (from the datamodule's ``templates`` at setup if None).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine to 0.
        save_to: if set, the trained tensors (everything that learned) are written there as
            safetensors at the end of fit.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        classnames: Optional[list[str]] = None,
        templates: Optional[list[str]] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
        save_to: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.classnames, self.templates = list(classnames or []), list(templates or [])
        text = backbone.text
        for p in (text.hf if hasattr(text, "hf") else text.text).parameters():
            p.requires_grad_(False)
        for p in _projection_params(text):
            p.requires_grad_(True)
        self._caption_cache: Optional[Tensor] = None  # [T, C, D] pooled, before projection

    def train(self, mode: bool = True) -> "ContrastiveCLIP":
        """The locked text transformer stays in eval mode (no dropout), so cached captions are exact."""
        super().train(mode)
        text = self.backbone.text
        (text.hf if hasattr(text, "hf") else text.text.transformer).eval()
        return self

    def setup(self, stage: str) -> None:
        dm = data_of(self.trainer, CaptionData)
        if not self.classnames and dm is not None:
            self.classnames = list(dm.classnames)
        if not self.templates and dm is not None:
            self.templates = list(dm.templates)
        if not self.classnames or not self.templates:
            raise ValueError(
                "ContrastiveCLIP needs class names and caption templates: set model.init_args.classnames and "
                "model.init_args.templates, or use a datamodule that has both (datamodules.protocols.CaptionData, "
                "e.g. MNISTPretrainDataModule)."
            )

    @torch.no_grad()
    def _pooled_captions(self) -> Tensor:
        if self._caption_cache is None or self._caption_cache.device != self.device:
            texts = [t.format(c) for t in self.templates for c in self.classnames]
            tokens = self.backbone.tokenize(texts).to(self.device)
            pooled = self.backbone.text(tokens, project=False).pooled
            self._caption_cache = pooled.view(len(self.templates), len(self.classnames), -1)
        return self._caption_cache

    def caption_features(self, template_idx: Tensor, labels: Tensor) -> Tensor:
        pooled = self._pooled_captions()[template_idx, labels]
        return F.normalize(self.backbone.text.project(pooled), dim=-1)

    def class_features(self) -> Tensor:
        """Zero-shot classifier: mean of normalised template features per class (CLIP ensembling)."""
        feats = F.normalize(self.backbone.text.project(self._pooled_captions()), dim=-1).mean(0)
        return F.normalize(feats, dim=-1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = batch["label"]
        t_idx = torch.randint(len(self.templates), labels.shape, device=labels.device)
        img = self.backbone.encode_image(batch["image"], normalize=True)
        txt = self.caption_features(t_idx, labels)
        logits = self.backbone.logit_scale.exp().clamp(max=100) * img @ txt.t()
        loss = unicl_loss(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("train/logit_scale", self.backbone.logit_scale.exp(), batch_size=labels.shape[0])
        return loss

    def _zero_shot(self, batch: dict[str, Tensor], stage: str) -> None:
        img = self.backbone.encode_image(batch["image"], normalize=True)
        logits = img @ self.class_features().t()
        self.log(f"{stage}/zeroshot_acc", accuracy_percent(logits, batch["label"]), prog_bar=True, batch_size=img.shape[0])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._zero_shot(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._zero_shot(batch, "test")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, total - 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step - warm) / max(1, total - warm))).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trained_state(self) -> dict[str, Tensor]:
        """The tensors that learned, keyed as in the open_clip model's state dict."""
        names = {n for n, p in self.backbone.model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.model.state_dict().items() if k in names}

    def on_fit_end(self) -> None:
        if self.hparams.save_to and self.trainer.is_global_zero:
            path = Path(self.hparams.save_to)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(self.trained_state(), str(path), metadata={"format": "vlm-quickstart-clip-1"})


def _projection_params(text_runner: Any) -> list[torch.nn.Parameter]:
    if hasattr(text_runner, "encoder"):  # HF text tower: open_clip's proj module
        return list(text_runner.encoder.proj.parameters())
    proj = text_runner.text.text_projection
    return [proj] if isinstance(proj, torch.nn.Parameter) else list(proj.parameters())
