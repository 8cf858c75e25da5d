"""Frozen backbones wrapped for the block loop: open_clip CLIP and timm ViT."""

from vlm.backbones.base import Backbone
from vlm.backbones.clip import ClipBackbone
from vlm.backbones.vit import ViTBackbone
from vlm.backbones.llava import LlavaBackbone
from vlm.backbones.llava_next import LlavaNextBackbone

__all__ = ["Backbone", "ClipBackbone", "LlavaBackbone", "LlavaNextBackbone", "ViTBackbone"]
