"""open_clip CLIP as a backbone: factory (registry name, local-dir/hf-hub, or inline config),
tokenizer, and the two block-loop runners.

Examples::

    ClipBackbone("ViT-B-16-quickgelu", pretrained="/weights/openai_vit_b16.pt")  # OpenAI weights
    ClipBackbone("local-dir:/models/my_clip")                                   # exported folder
    ClipBackbone("tiny", model_cfg={...})                                        # inline config
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import open_clip
import torch
from torch import Tensor
from torch.nn import functional as F

from vlm.backbones.base import Backbone
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD
from vlm.hooks import TowerHook
from vlm.runtime.quiet import quiet_hf_text_load
from vlm.towers.clip import ClipVisionRunner, text_runner_for
from vlm.towers.runner import TowerOutput



def build_open_clip(
    model_name: str,
    pretrained: Optional[str] = None,
    model_cfg: Optional[dict[str, Any]] = None,
    quick_gelu: bool = False,
) -> torch.nn.Module:
    """Create an open_clip model. ``model_cfg`` (an open_clip JSON config as a dict) builds it
    directly, so tiny test models need no registration; ``pretrained`` is a tag or a local file."""
    if model_cfg is None:
        with quiet_hf_text_load():  # an HF text tower's by-design pooler report only (vlm.runtime.quiet)
            return open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=quick_gelu)
    cfg = copy.deepcopy(model_cfg)
    cfg.setdefault("quick_gelu", quick_gelu)
    cfg.pop("custom_text", None)
    cls = open_clip.CustomTextCLIP if "hf_model_name" in cfg.get("text_cfg", {}) else open_clip.CLIP
    with quiet_hf_text_load():
        model = cls(**cfg)
    if pretrained:
        open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
    return model


def build_tokenizer(model_name: str, model_cfg: Optional[dict[str, Any]] = None):
    if model_cfg is None:
        return open_clip.get_tokenizer(model_name)
    text_cfg = model_cfg.get("text_cfg", {})
    ctx = text_cfg.get("context_length", 77)
    if "hf_model_name" in text_cfg:
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(text_cfg["hf_model_name"], context_length=ctx)
    return open_clip.SimpleTokenizer(context_length=ctx)


class ClipBackbone(Backbone):
    """A CLIP image/text model run block by block, frozen by default.

    Args:
        model_name: open_clip model name (``ViT-B-16``), ``local-dir:PATH`` or ``hf-hub:ORG/REPO``.
        pretrained: open_clip pretrained tag or a local weights file (ignored with a schema).
        model_cfg: an inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        quick_gelu: force QuickGELU (needed for OpenAI weights).
        freeze: freeze all weights and keep the model in eval mode.
        trim_text: run the text tower only up to the longest prompt of each batch (the last EOT
            under the causal mask, the last non-padding token of an HF tower) instead of the full
            context; the pooled features are the same (``vlm.towers.runner.trim_text``). False
            runs every position, as open_clip does.
    """

    family = "open_clip"

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: Optional[str] = None,
        model_cfg: Optional[dict[str, Any]] = None,
        quick_gelu: bool = False,
        freeze: bool = True,
        trim_text: bool = True,
    ) -> None:
        super().__init__(freeze=freeze)
        self.model_name, self.pretrained, self.model_cfg, self.quick_gelu = model_name, pretrained, model_cfg, quick_gelu
        self.model = build_open_clip(model_name, pretrained, model_cfg, quick_gelu)
        self.tokenizer = build_tokenizer(model_name, model_cfg)
        self.vision = ClipVisionRunner(self.model.visual)
        self.text = text_runner_for(self.model, trim=trim_text)
        self._apply_freeze()

    # --- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "quick_gelu": self.quick_gelu,
            "inline_config": self.model_cfg is not None,
        }

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def patches_per_image(self) -> Optional[int]:
        """Patch tokens per image: open_clip's ``visual.grid_size`` (rows x columns), None if absent."""
        grid = getattr(self.model.visual, "grid_size", None)
        return int(grid[0]) * int(grid[1]) if grid is not None else None

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(getattr(self.model.visual, "image_mean", None) or CLIP_MEAN)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(getattr(self.model.visual, "image_std", None) or CLIP_STD)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") and torch.is_tensor(
            self.model.text_projection
        ) else int(self.model.visual.output_dim)

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`encode_image`'s output: the joint embedding width."""
        return self.embed_dim

    # --- forward pieces -----------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts).to(self.logit_scale.device)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def encode_image(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None, normalize: bool = False) -> Tensor:
        out = self.vision(images, hooks).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self,
        tokens: Tensor,
        hooks: Optional[Iterable[TowerHook]] = None,
        embeds: Optional[Tensor] = None,
        normalize: bool = False,
    ) -> Tensor:
        out = self.text(tokens, hooks, embeds).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def run_vision(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        return self.vision(images, hooks)
