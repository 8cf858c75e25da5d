"""open_clip CLIP as a backbone: factory (registry name, local-dir/hf-hub, or inline config),
tokenizer, and the two block-loop runners.

Examples::

    ClipBackbone("ViT-B-16-quickgelu", pretrained="/weights/openai_vit_b16.pt")  # OpenAI weights
    ClipBackbone("local-dir:/models/my_clip")                                   # exported folder
    ClipBackbone("tiny", model_cfg={...})                                        # inline config
    ClipBackbone("ViT-B-16-SigLIP", pretrained="webli")                         # timm-backed tower

The image tower is open_clip's own ViT or a timm-backed one (``TimmModel``: SigLIP, SigLIP2,
EVA02-CLIP), each with its runner (``vlm.towers.clip.vision_runner_for``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from torch import Tensor

from vlm.backbones.base import TwoTowerBackbone
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD
from vlm.runtime.quiet import quiet_hf_text_load
from vlm.towers.clip import text_runner_for, vision_runner_for


def build_open_clip(
    model_name: str,
    pretrained: Optional[str] = None,
    model_cfg: Optional[dict[str, Any]] = None,
    quick_gelu: bool = False,
) -> torch.nn.Module:
    """Create an open_clip model. ``model_cfg`` (an open_clip JSON config as a dict) builds it
    directly, so tiny test models need no registration; ``pretrained`` is a tag or a local file.

    As open_clip does, a config with ``custom_text: true`` (SigLIP, EVA02-CLIP) or an HF text
    tower builds a ``CustomTextCLIP`` (text tower under ``model.text``), so open_clip's state dicts
    of those models load. A registry name with a local weights file gets the normalisation its
    pretrained tags share (open_clip sets it from a tag only; :func:`tag_preprocess`)."""
    if model_cfg is None:
        force = tag_preprocess(model_name) if pretrained and Path(pretrained).is_file() else None
        with quiet_hf_text_load():  # an HF text tower's by-design pooler report only (vlm.runtime.quiet)
            return open_clip.create_model(
                model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, force_preprocess_cfg=force
            )
    cfg = copy.deepcopy(model_cfg)
    cfg.setdefault("quick_gelu", quick_gelu)
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise TypeError("open_clip CoCa configs (multimodal_cfg) are not supported by ClipBackbone; use a CLIP config.")
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    with quiet_hf_text_load():
        model = cls(**cfg)
    if pretrained:
        open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
    return model


def tag_preprocess(model_name: str) -> Optional[dict[str, Any]]:
    """``{"mean", "std"}`` that every pretrained tag of the open_clip registry name ``model_name``
    gives (e.g. 0.5 for SigLIP), or None when it has no tags or they differ."""
    found = {
        (tuple(cfg["mean"]), tuple(cfg["std"]))
        for name, tag in open_clip.list_pretrained()
        if name == model_name
        for cfg in [open_clip.get_pretrained_cfg(name, tag)]
        if cfg.get("mean") and cfg.get("std")
    }
    if len(found) != 1:
        return None
    mean, std = found.pop()
    return {"mean": mean, "std": std}


def build_tokenizer(model_name: str, model_cfg: Optional[dict[str, Any]] = None):
    """open_clip's tokenizer of a registry name, or of an inline config: its HF text model's or
    ``hf_tokenizer_name``'s HF tokenizer, else open_clip's ``SimpleTokenizer``."""
    if model_cfg is None:
        return open_clip.get_tokenizer(model_name)
    text_cfg = model_cfg.get("text_cfg", {})
    ctx = text_cfg.get("context_length", 77)
    hf_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    if hf_name:
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(
            hf_name, context_length=ctx, tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {})
        )
    return open_clip.SimpleTokenizer(context_length=ctx)


def special_token_ids(tokenizer: Any) -> tuple[Optional[int], Optional[int]]:
    """The ids open_clip's tokenizer starts and ends every text with: ``SimpleTokenizer``'s SOT and
    EOT; an HF tokenizer's BOS (when it adds one; SigLIP's does not) and EOS."""
    sot = getattr(tokenizer, "sot_token_id", None)
    if sot is not None:
        return int(sot), int(tokenizer.eot_token_id)
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None:
        return None, None
    ids = hf("x")["input_ids"]
    bos, eos = getattr(hf, "bos_token_id", None), getattr(hf, "eos_token_id", None)
    return (int(bos) if bos is not None and ids and ids[0] == bos else None), (None if eos is None else int(eos))


class ClipBackbone(TwoTowerBackbone):
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
        self.vision = vision_runner_for(self.model.visual)
        sos, end = special_token_ids(self.tokenizer)
        self.text = text_runner_for(self.model, trim=trim_text, sos_id=sos, end_id=end)
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
        """Patch tokens per image: open_clip's ``visual.grid_size`` (rows x columns), or the timm
        trunk's patch count of a timm-backed tower; None if absent."""
        grid = getattr(self.model.visual, "grid_size", None)
        if grid is not None:
            return int(grid[0]) * int(grid[1])
        return getattr(self.vision, "patches_per_image", None)

    def _preprocess(self, key: str) -> Optional[tuple[float, ...]]:
        """open_clip's normalisation on the image tower (set from a pretrained tag), else a
        timm-backed tower's trunk's own (its timm pretrained config, e.g. 0.5 for SigLIP)."""
        visual = self.model.visual
        value = getattr(visual, f"image_{key}", None)
        if not value:
            value = (getattr(getattr(visual, "trunk", None), "pretrained_cfg", None) or {}).get(key)
        return tuple(float(v) for v in value) if value else None

    @property
    def mean(self) -> tuple[float, ...]:
        return self._preprocess("mean") or tuple(CLIP_MEAN)

    @property
    def std(self) -> tuple[float, ...]:
        return self._preprocess("std") or tuple(CLIP_STD)

    @property
    def embed_dim(self) -> int:
        """The joint embedding width: the text projection's output (a matrix, or a linear layer
        with bias as in SigLIP), else the image tower's output width."""
        text = getattr(self.model, "text", self.model)
        proj = getattr(text, "text_projection", None)
        if torch.is_tensor(proj):
            return int(proj.shape[1])
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        out = getattr(self.model.visual, "output_dim", None)
        return int(out) if out is not None else int(self.vision.output_dim)

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

    @property
    def logit_bias(self) -> Optional[Tensor]:
        """SigLIP's learned logit bias (``logits = exp(logit_scale) cos + logit_bias`` under its
        sigmoid loss), None for CLIP. The classifiers use ``logit_scale`` only: a bias shared by
        every class changes no softmax or ranking, so it matters to a sigmoid loss alone."""
        return getattr(self.model, "logit_bias", None)
