"""timm ViT-family or Eva-family model as a backbone (features only; classifier heads live in the
LightningModule), run block by block by the runner of its class (``vlm.towers.timm_trunk``)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import timm
from torch import Tensor

from vlm.backbones.base import Backbone
from vlm.hooks import TowerHook
from vlm.towers.runner import TowerOutput
from vlm.towers.timm_trunk import timm_runner_for


class ViTBackbone(Backbone):
    """A timm ``VisionTransformer`` (ViT, DINOv2, SigLIP towers) or ``Eva`` (EVA02, DINOv3, RoPE
    ViTs) run block by block, frozen by default.

    Args:
        model_name: timm model name (``vit_base_patch16_224.augreg_in21k``,
            ``eva02_base_patch14_224.mim_in22k``, ``vit_base_patch16_dinov3.lvd1689m``); ``hf-hub:`` or
            ``local-dir:`` ids work as in timm.
        pretrained: load the model's pretrained weights (from the hub cache, or ``checkpoint_path``).
        checkpoint_path: a local weights file (``.safetensors``/``.pth``) loaded through timm's
            pretrained path, so its checkpoint filter (e.g. for CLIP/OpenAI weights) applies.
        model_kwargs: extra ``timm.create_model`` kwargs (``global_pool``, ``reg_tokens``, ...).
    """

    family = "timm"

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        freeze: bool = True,
    ) -> None:
        super().__init__(freeze=freeze)
        self.model_name, self.pretrained, self.checkpoint_path = model_name, pretrained, checkpoint_path
        self.model_kwargs = dict(model_kwargs or {})
        kwargs = dict(self.model_kwargs)
        kwargs.setdefault("num_classes", 0)
        if checkpoint_path:
            kwargs["pretrained_cfg_overlay"] = dict(file=checkpoint_path)
        self.model = timm.create_model(model_name, pretrained=pretrained or bool(checkpoint_path), **kwargs)
        self.vision = timm_runner_for(self.model)
        self._apply_freeze()

    def identity(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "checkpoint_path": self.checkpoint_path,
            "model_kwargs": self.model_kwargs,
        }

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`encode_image`'s output: timm's ``num_features``."""
        return self.num_features

    @property
    def image_size(self) -> Optional[int]:
        """The square size the patch embedding requires, or None when it takes any size (built with
        ``dynamic_img_size`` or without ``strict_img_size``)."""
        embed = getattr(self.model, "patch_embed", None)  # timm models without one take any size
        if embed is None or getattr(embed, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
            return None
        size = getattr(embed, "img_size", None)
        if isinstance(size, (tuple, list)):
            size = size[0]
        return int(size) if size is not None else None

    @property
    def patches_per_image(self) -> Optional[int]:
        """Patch tokens per image: timm's ``patch_embed.num_patches`` (the grid of the model's
        ``img_size``; for a ``dynamic_img_size`` model, DINOv3 for one, the count at that size), None
        if absent."""
        count = getattr(getattr(self.model, "patch_embed", None), "num_patches", None)
        return int(count) if count is not None else None

    @property
    def data_config(self) -> dict[str, Any]:
        return timm.data.resolve_data_config({}, model=self.model)

    def encode_image(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> Tensor:
        return self.vision(images, hooks).pooled

    def run_vision(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        return self.vision(images, hooks)
