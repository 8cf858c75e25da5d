"""Shared fixtures: offline hub, restored torch state, a tiny CLIP."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import tiny_clip_cfg

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def tiny_clip():
    from vlm.backbones import ClipBackbone

    torch.manual_seed(0)
    return ClipBackbone("tiny", model_cfg=tiny_clip_cfg())
