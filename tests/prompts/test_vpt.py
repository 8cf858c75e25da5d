"""VPT (Jia et al., ECCV 2022) against plain loops over the library blocks (timm and open_clip)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import tiny_clip_cfg
from vlm.backbones import ClipBackbone, ViTBackbone
from vlm.context import Tower
from vlm.prompts.vpt import VPT
from vlm.tokens import TokenType

TOL = dict(atol=1e-5, rtol=1e-5)
P = 3


def make(bb, deep: bool, dropout: float = 0.0) -> VPT:
    torch.manual_seed(1)
    vpt = VPT(num_tokens=P, deep=deep, dropout=dropout)
    vpt.build(bb)
    return vpt.eval()


def layer_prompts(vpt: VPT, layer: int, batch: int) -> torch.Tensor:
    p = vpt.prompt_embeddings[0] if layer == 0 else vpt.deep_prompt_embeddings[layer - 1]
    return p.unsqueeze(0).expand(batch, -1, -1)


def insert_prompts(x: torch.Tensor, vpt: VPT, start: int) -> torch.Tensor:
    """Eq. 4: [prefix, P, E_0], the prompts right after the CLS/register tokens."""
    return torch.cat([x[:, :start], layer_prompts(vpt, 0, x.shape[0]), x[:, start:]], dim=1)


def deep_swap(i: int, x: torch.Tensor, vpt: VPT, start: int) -> torch.Tensor:
    """Eq. 7: VPT-Deep replaces the prompt slots with layer i's prompts before block i >= 1."""
    if i == 0 or not vpt.deep:
        return x
    return torch.cat([x[:, :start], layer_prompts(vpt, i, x.shape[0]), x[:, start + P :]], dim=1)


TIMM = {
    "cls": {},
    "registers_avg": {"reg_tokens": 2, "global_pool": "avg"},
    "registers_noembedcls": {"reg_tokens": 1, "no_embed_class": True},
}


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("variant", list(TIMM))
def test_timm_matches_plain_loop(variant, deep):
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 32, **TIMM[variant]})
    m = bb.model
    vpt = make(bb, deep)
    assert vpt.prompt_embeddings.shape == (1, P, m.embed_dim)
    if deep:
        assert vpt.deep_prompt_embeddings.shape == (len(m.blocks) - 1, P, m.embed_dim)
    images = torch.randn(2, 3, 32, 32)
    start = m.num_prefix_tokens
    with torch.no_grad():
        x = m.norm_pre(insert_prompts(m._pos_embed(m.patch_embed(images)), vpt, start))
        for i, blk in enumerate(m.blocks):
            x = blk(deep_swap(i, x, vpt, start))
        ref = m.norm(x)
        state = bb.vision.forward_features(images, [vpt])
        torch.testing.assert_close(state.x, ref, **TOL)
        types = state.batch_types[0]
        assert (types[start : start + P] == int(TokenType.PROMPT)).all()
        assert (state.positions[:, start : start + P] == -1).all()
        # pooling excludes the prompts: timm's own head on the sequence without them
        without = torch.cat([ref[:, :start], ref[:, start + P :]], dim=1)
        torch.testing.assert_close(bb.encode_image(images, [vpt]), m.forward_head(without, pre_logits=True), **TOL)
        if m.global_pool == "avg":
            torch.testing.assert_close(bb.encode_image(images, [vpt]), m.fc_norm(ref[:, start + P :].mean(1)), **TOL)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_open_clip_matches_plain_loop(pool, deep):
    torch.manual_seed(0)
    bb = ClipBackbone("tiny", model_cfg=tiny_clip_cfg(pool_type=pool))
    v = bb.model.visual
    vpt = make(bb, deep)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(2, 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(insert_prompts(x, vpt, 1))
        for i, blk in enumerate(v.transformer.resblocks):
            x = blk(deep_swap(i, x, vpt, 1))
        x = v.ln_post(x)
        pooled = x[:, 0] if pool == "tok" else x[:, 1 + P :].mean(1)
        torch.testing.assert_close(bb.encode_image(images, [vpt]), pooled @ v.proj, **TOL)


def test_init_bound_from_patch_size():
    torch.manual_seed(0)
    for bb, patch, dim in [
        (ViTBackbone("test_vit", model_kwargs={"img_size": 32}), 16, 64),
        (ClipBackbone("tiny", model_cfg=tiny_clip_cfg()), 8, 64),
    ]:
        vpt = make(bb, deep=True)
        bound = math.sqrt(6.0 / (3 * patch * patch + dim))
        for p in vpt.parameters():
            assert float(p.detach().abs().max()) <= bound and float(p.detach().abs().max()) > 0.8 * bound


def test_gradient_reaches_only_prompts_and_every_layer():
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 32, "reg_tokens": 1, "global_pool": "avg"})
    vpt = make(bb, deep=True)
    assert sorted(n for n, _ in vpt.named_parameters()) == ["deep_prompt_embeddings", "prompt_embeddings"]
    bb.encode_image(torch.randn(2, 3, 32, 32), [vpt]).square().sum().backward()
    assert vpt.prompt_embeddings.grad.abs().gt(0).any()
    assert vpt.deep_prompt_embeddings.grad.abs().flatten(1).amax(1).gt(0).all()
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())


def test_prompt_dropout_only_in_training():
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 32})
    images = torch.randn(2, 3, 32, 32)
    plain, dropped = make(bb, deep=True), make(bb, deep=True, dropout=0.5)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images, [dropped]), bb.encode_image(images, [plain]), **TOL)
        dropped.train()
        assert not torch.allclose(bb.encode_image(images, [dropped]), bb.encode_image(images, [plain]), atol=1e-4)


def test_vision_only_and_needs_build():
    vpt = VPT(num_tokens=2)
    assert vpt.towers == (Tower.VISION,) and not vpt.learns_text
    assert list(vpt.state_dict()) == []
    torch.manual_seed(0)
    bb = ViTBackbone("test_vit", model_kwargs={"img_size": 32})
    with pytest.raises(RuntimeError, match="build"):
        bb.encode_image(torch.randn(1, 3, 32, 32), [vpt])
    with pytest.raises(ValueError):
        VPT(num_tokens=0)
