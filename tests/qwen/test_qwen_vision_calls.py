"""How the Qwen vision tower calls attention: one packed varlen ``vlm.kernels.attention`` call per
block (no per-window loop in the runner), whose sequences are the windows (Qwen2.5-VL's windowed
blocks) or the images (full-attention blocks), over the real tokens only; after a cut the windows
hold the kept tokens. The fused Triton varlen kernel runs the whole tower (interpreted on CPU under
``TRITON_INTERPRET=1``, compiled on a GPU) and gives transformers' merged tokens."""

from __future__ import annotations

import os

import pytest
import torch

from tests.qwen.hooks import KeepUnits
from tests.qwen.tiny import MODELS, encode, tiny_model
from vlm.towers import qwen_vision
from vlm.towers.qwen_vision import QwenVisionRunner, window_ids

#: per image (merged grid 3x5, 2x2, 4x4, 2x6; windows of 2x2 merged tokens): tokens per window, in order
WINDOWS = [[16, 16, 8, 8, 8, 4], [16], [16, 16, 16, 16], [16, 16, 16]]


def spy_calls(monkeypatch):
    calls = []
    real = qwen_vision.attention

    def spy(q, k, v, spec):
        calls.append((tuple(q.shape), spec.cu_seqlens_q.tolist(), spec.cu_seqlens_k.tolist(), spec.k_lengths))
        return real(q, k, v, spec)

    monkeypatch.setattr(qwen_vision, "attention", spy)
    return calls


def cumulative(lengths: list[int]) -> list[int]:
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def test_window_ids_follow_the_raster_of_windows():
    # 3 x 5 merged tokens, windows of 2 x 2 tokens: window columns 0,0,1,1,2 / rows 0,0,1
    ids = window_ids((1, 6, 10), merge=2, window_units=2)[::4].view(3, 5)
    assert ids.tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]


@torch.no_grad()
def test_one_varlen_call_per_block(monkeypatch):
    model = tiny_model("qwen2_5_vl")
    enc = encode("qwen2_5_vl", "right")
    calls = spy_calls(monkeypatch)
    QwenVisionRunner(model.model.visual).run(enc["pixel_values"], enc["image_grid_thw"])
    images = cumulative([60, 16, 64, 48])
    windows = cumulative([n for w in WINDOWS for n in w])
    assert [c[1] for c in calls] == [windows, images, windows, windows]  # block 1 is the full-attention one
    assert all(c[1] == c[2] and c[3] is None and c[0] == (188, 4, 8) for c in calls)

    calls.clear()  # a cut after block 0: the later blocks attend over the kept tokens only
    keep = [[0, 3, 4], [2], [1, 2, 5], [0, 11]]
    QwenVisionRunner(model.model.visual).run(enc["pixel_values"], enc["image_grid_thw"], [KeepUnits(keep, layer=0)])
    assert calls[1][1] == cumulative([12, 4, 12, 8]) and calls[1][0] == (36, 4, 8)
    # windows: image 0 units 0, 3, 4 -> windows 0, 1, 2; image 1 -> 0; image 2 units 1, 5 -> window 0 and
    # unit 2 -> window 1; image 3 units 0, 11 -> windows 0 and 2
    assert calls[2][1] == calls[3][1] == cumulative([4, 4, 4, 4, 8, 4, 4, 4])


_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not _GPU,
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 exported before Python starts")
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_triton_varlen_kernel_runs_the_tower(kind, monkeypatch):
    """Head dim 16 (two heads of a 32-wide tower), the Triton backend forced (an unsupported call
    raises instead of falling back)."""
    import transformers

    config, _ = MODELS[kind]
    config = dict(config, vision_config=dict(config["vision_config"], num_heads=2))
    name = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, name.replace("ForConditionalGeneration", "Config"))(**config)
    model = getattr(transformers, name)(cfg)
    device = "cuda" if _GPU else "cpu"
    model = model.to(device).eval()
    enc = encode(kind, "right", slice(0, 2))
    pix, grid = enc["pixel_values"].to(device), enc["image_grid_thw"].to(device)
    ref = model.model.get_image_features(pix, grid).pooler_output
    monkeypatch.setenv("VLM_ATTENTION_BACKEND", "triton")
    ours = QwenVisionRunner(model.model.visual).run(pix, grid)
    for i, feats in enumerate(ref):
        torch.testing.assert_close(ours.features[i, : feats.shape[0]], feats, atol=2e-5, rtol=1e-4)
