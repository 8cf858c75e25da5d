"""Frozen backbones wrapped for the block loop: open_clip CLIP (and SigLIP, EVA-CLIP), Hugging Face
CLIP/SigLIP, timm ViT (and EVA02, DINOv2/v3), LLaVA, LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL.

The classes are imported on first use (``vlm.backbones.ClipBackbone``), so a CLIP config imports
neither timm's ViT nor the LLaVA code, and the reverse."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Backbone": "vlm.backbones.base",
    "ClipBackbone": "vlm.backbones.clip",
    "HFClipBackbone": "vlm.backbones.hf_clip",
    "ViTBackbone": "vlm.backbones.vit",
    "LlavaBackbone": "vlm.backbones.llava",
    "LlavaNextBackbone": "vlm.backbones.llava_next",
    "Qwen2_5VLBackbone": "vlm.backbones.qwen",
    "Qwen3VLBackbone": "vlm.backbones.qwen",
}

__all__ = ["Backbone", "ClipBackbone", "HFClipBackbone", "LlavaBackbone", "LlavaNextBackbone", "Qwen2_5VLBackbone", "Qwen3VLBackbone", "ViTBackbone"]

if TYPE_CHECKING:
    from vlm.backbones.base import Backbone
    from vlm.backbones.clip import ClipBackbone
    from vlm.backbones.hf_clip import HFClipBackbone
    from vlm.backbones.llava import LlavaBackbone
    from vlm.backbones.llava_next import LlavaNextBackbone
    from vlm.backbones.qwen import Qwen2_5VLBackbone, Qwen3VLBackbone
    from vlm.backbones.vit import ViTBackbone


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
