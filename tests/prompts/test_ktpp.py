"""KTPP (Li et al., ACM MM 2024) against plain references written from its equations.

KCA: ``o = softmax(Mask_kNN(Q K^T / sqrt(d))) V + alpha * mean_j v_j`` per (batch, head, row);
PCP: ``P_s = T W_s``, ``P_s + gamma_s softmax(P_s F_s^T / sqrt(D)) F_s`` with ``F_s`` the patch
grid average-pooled to g_s x g_s, inserted as key/value-only tokens after CLS.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlm.backbones import ViTBackbone
from vlm.context import Tower, TowerContext
from vlm.kernels import AttnSpec
from vlm.prompts.ktpp import KTPP, resolve_topk
from vlm.tokens import TokenState

TOL = dict(atol=2e-5, rtol=2e-5)
C, E = 3, 12


def vit() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone("test_vit", model_kwargs={"img_size": 32, "patch_size": 8, "depth": 3})


def make(bb, **kw) -> KTPP:
    torch.manual_seed(1)
    k = KTPP(text_dim=E, **kw)
    k.build(bb)
    with torch.no_grad():
        k.alpha.uniform_(-0.5, 0.5)
    k.set_class_text(torch.randn(C, E))
    return k.eval()


def test_topk_equal_n_is_plain_attention():
    bb = vit()
    k = make(bb, stage_topk=(17, 17, 17), context="none", pyramid=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = bb.vision.forward_features(images, [k]).x
        torch.testing.assert_close(ours, bb.model.forward_features(images), **TOL)
        state = TokenState.create(torch.randn(2, 17, 64), torch.tensor([0] + [1] * 16))
        ctx = TowerContext(Tower.VISION, bb.vision.num_layers).at(0, bb.vision.blocks[0])
        spec = k.attention_spec(ctx, state, AttnSpec())
    assert spec.topk == 17 and spec.epilogue_add is None


def plain_ktpp(bb, k: KTPP, images, ks, grids):
    m = bb.model
    x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
    b, d = x.shape[0], x.shape[-1]
    for layer, blk in enumerate(m.blocks):
        s = layer * 3 // len(m.blocks)
        patches = x[:, 1:]
        side = int(math.isqrt(patches.shape[1]))
        fmap = torch.nn.functional.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(b, d, side, side), grids[s])
        fmap = fmap.flatten(2).transpose(1, 2)
        p = (k.class_embeddings @ k.t2i[s].weight.T).expand(b, -1, -1)
        p = p + k.gamma[s] * ((p @ fmap.transpose(1, 2)) / math.sqrt(d)).softmax(-1) @ fmap
        seq = torch.cat([x[:, :1], p, x[:, 1:]], 1)
        h = blk.attn.num_heads
        n_all = seq.shape[1]
        q, kk, v = blk.attn.qkv(blk.norm1(seq)).view(b, n_all, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        q = torch.cat([q[:, :, :1], q[:, :, 1 + C :]], 2)
        logits = (q @ kk.transpose(-1, -2)) * blk.attn.scale
        kth = logits.topk(ks[s], dim=-1).values[..., -1:]
        a = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        o = a @ v + k.alpha[layer] * v.mean(2, keepdim=True)  # context prompt: mean of all tokens' values
        x = x + blk.attn.proj(o.transpose(1, 2).reshape(b, -1, d))
        x = x + blk.mlp(blk.norm2(x))
    return m.norm(x)


def test_kca_and_pyramid_prompts_match_plain_reference():
    bb = vit()
    k = make(bb, stage_topk=(0.75, 6, 0.25), pyramid_grids=(4, 2, 1), gamma_init=0.7)
    images = torch.randn(2, 3, 32, 32)
    n_keys = 1 + C + 16
    ks = [math.ceil(0.75 * n_keys), 6, math.ceil(0.25 * n_keys)]
    with torch.no_grad():
        ref = plain_ktpp(bb, k, images, ks, (4, 2, 1))
        state = bb.vision.forward_features(images, [k])
    torch.testing.assert_close(state.x, ref, **TOL)
    assert state.x.shape[1] == 17  # class prompts dropped after every block


def test_gradients_reach_alpha_projections_and_gamma():
    bb = vit()
    k = make(bb).train()
    bb.encode_image(torch.randn(2, 3, 32, 32), [k]).square().sum().backward()
    assert k.alpha.grad.abs().gt(0).all() and k.gamma.grad.abs().gt(0).all()
    assert all(lin.weight.grad.abs().gt(0).any() for lin in k.t2i)
    assert all(p.grad is None for p in bb.parameters())


def test_stages_topk_and_errors():
    assert [resolve_topk(v, 20) for v in (0.75, 0.01, 5, 50)] == [15, 1, 5, 20]
    bb = vit()
    k = make(bb, stage_topk=(1.0, 1.0, 1.0))
    assert [k.stage(i) for i in range(3)] == [0, 1, 2]
    k.set_class_text(None)
    with pytest.raises(RuntimeError, match="set_class_text"):
        bb.encode_image(torch.randn(1, 3, 32, 32), [k])
    with pytest.raises(ValueError):
        KTPP(context="mean_knn_out")
    with pytest.raises(ValueError):
        KTPP(stage_topk=(0.5, 0.5), pyramid_grids=(2, 1, 1))
