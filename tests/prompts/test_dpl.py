"""DPL (reconstruction, arXiv 2308.10061): exact gate == ordinary attention, and the decoupled
attention == a hand-written per-group softmax, end to end on a tiny CLIP."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.prompts import deep_reference as ref
from tests.prompts.test_ivlp import three_layer_clip
from vlm.backbones import ClipBackbone
from vlm.context import Tower, TowerContext
from vlm.kernels import AttnSpec
from vlm.prompts import create
from vlm.prompts.dpl import DPL, pack_bits
from vlm.tokens import TokenType

TOL = dict(atol=1e-5, rtol=1e-5)
CLASSES = ["cat", "sea_lion", "golden retriever dog"]


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    return three_layer_clip()


def make(bb: ClipBackbone, **kwargs) -> DPL:
    torch.manual_seed(1)
    learner = DPL(**kwargs)
    learner.build(bb)
    if learner.gate_logits:  # distinct gates per layer, head and query group
        with torch.no_grad():
            for p in learner.gate_logits.values():
                p.add_(torch.randn_like(p))
    return learner


def prompts_of(learner: DPL) -> tuple[list, list]:
    text = [learner.ctx] + list(learner.text_deep if learner.text_deep is not None else [])
    vision = [learner.vision_ctx] + list(learner.vision_deep if learner.vision_deep is not None else [])
    return text, vision


@pytest.mark.parametrize("text_mode", ["causal", "language_conditioned"])
def test_exact_gate_reproduces_ordinary_attention(clip, text_mode):
    learner = make(clip, n_ctx_text=2, n_ctx_vision=3, depth_text=2, depth_vision=2, gate="exact", text_mode=text_mode)
    text_p, vision_p = prompts_of(learner)
    tokens = ref.prompt_tokens(clip, CLASSES, "a photo of a")
    inputs = learner.text_inputs(CLASSES)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images, [learner]), ref.clip_vision(clip, images, vision_p), **TOL)
        text = clip.encode_text(inputs.tokens, [learner], inputs.embeds)
    want = ref.clip_text(clip, tokens, text_p)
    if text_mode == "causal":
        torch.testing.assert_close(text, want, **TOL)
    else:  # prompt rows read the class name; their outputs flow into block 2 (>= depth_text)
        assert not torch.allclose(text, want, atol=1e-4)


def gated_block(blk, x, visible, prompt_k, row_prompt, logits):
    """One open_clip block with attention = sum_g gate_g softmax_g(s) V_g, written out per group.

    visible [B, N, N] (query, key) may-attend; prompt_k [B, N] prompt keys; row_prompt [B, N]
    prompt query rows; logits [H, 2] gate logits (instance rows, prompt rows).
    """
    b, n, d = x.shape
    heads = blk.attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    parts, masses = [], []
    for keys in (~prompt_k, prompt_k):
        m = (visible & keys[:, None, :])[:, None]  # [B, 1, N, N]
        e = torch.exp(s - s.amax(-1, keepdim=True)) * m
        z = e.sum(-1, keepdim=True)
        parts.append((e / z.clamp_min(1e-30)) @ v)
        masses.append(z)
    sees = [(z > 0) for z in masses]
    g = torch.sigmoid(logits)  # [H, 2]
    g_row = torch.where(row_prompt[:, None, :, None], g[None, :, None, 1:2], g[None, :, None, 0:1])
    g_inst = torch.where(sees[0] & sees[1], g_row, sees[0].to(s.dtype))  # one visible group: gate 1 for it
    out = g_inst * parts[0] + (1 - g_inst) * parts[1] * sees[1]
    x = x + blk.attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
    return x + blk.mlp(blk.ln_2(x))


@pytest.mark.parametrize(
    "flags",
    [dict(gate="learned"), dict(gate="constant", gate_init=0.7, i2p=False, p2p=False), dict(gate="learned", p2i=False)],
    ids=["learned-all", "constant-no-i2p-p2p", "learned-no-p2i"],
)
def test_segmented_attention_matches_plain_per_group_softmax(clip, flags):
    learner = make(clip, n_ctx_text=2, n_ctx_vision=3, depth_text=1, depth_vision=2, **flags)
    allow = {
        (False, False): True,
        (False, True): flags.get("i2p", True),
        (True, False): flags.get("p2i", True),
        (True, True): flags.get("p2p", True),
    }

    def flag_mask(row_prompt, prompt_k):
        m = torch.zeros(row_prompt.shape[0], row_prompt.shape[1], prompt_k.shape[1], dtype=torch.bool)
        for (rp, kp), on in allow.items():
            if on:
                m |= (row_prompt[:, :, None] == rp) & (prompt_k[:, None, :] == kp)
        return m

    def logits(tower, layer, heads):
        if flags["gate"] == "constant":
            g = torch.tensor(flags["gate_init"])
            return torch.log(g / (1 - g)).expand(heads, 2)
        return learner.gate_logits[tower][layer]

    text_p, vision_p = prompts_of(learner)
    images = torch.randn(2, 3, 32, 32)
    tokens = ref.prompt_tokens(clip, CLASSES, "a photo of a")
    with torch.no_grad():
        # vision: prompts are the last 3 tokens; every token sees every token the flags allow
        nv = 1 + 16 + 3
        prompt_v = torch.zeros(2, nv, dtype=torch.bool)
        prompt_v[:, -3:] = True
        vis_v = flag_mask(prompt_v, prompt_v)
        blocks_v = clip.model.visual.transformer.resblocks
        fn_v = lambda i, x: gated_block(blocks_v[i], x, vis_v, prompt_v, prompt_v, logits("vision", i, blocks_v[i].attn.num_heads))
        torch.testing.assert_close(clip.encode_image(images, [learner]), ref.clip_vision(clip, images, vision_p, fn_v), **TOL)
        # text: CTX at 1..2; instance rows causal; CTX rows see every token up to EOT (language-conditioned)
        c, nt = tokens.shape
        prompt_t = torch.zeros(c, nt, dtype=torch.bool)
        prompt_t[:, 1:3] = True
        pos = torch.arange(nt)
        eot = tokens.argmax(-1)
        causal = pos[None, None, :] <= pos[None, :, None]
        upto_eot = (pos[None, :] <= eot[:, None])[:, None, :]
        vis_t = torch.where(prompt_t[:, :, None], upto_eot, causal) & flag_mask(prompt_t, prompt_t)
        blocks_t = clip.model.transformer.resblocks
        fn_t = lambda i, x: gated_block(blocks_t[i], x, vis_t, prompt_t, prompt_t, logits("text", i, blocks_t[i].attn.num_heads))
        inputs = learner.text_inputs(CLASSES)
        got = clip.encode_text(inputs.tokens, [learner], inputs.embeds)
        torch.testing.assert_close(got, ref.clip_text(clip, tokens, text_p, fn_t), **TOL)


def test_spec_is_structured_not_dense(clip):
    learner = make(clip, n_ctx_text=2, n_ctx_vision=3, depth_text=1, depth_vision=1)
    inputs = learner.text_inputs(CLASSES)
    state = clip.text.embed(inputs.tokens, inputs.embeds)
    ctx = TowerContext(Tower.TEXT, clip.text.num_layers)
    state = learner.on_tower_start(ctx, state)
    spec = learner.attention_spec(ctx.at(0, clip.text.blocks[0]), state, AttnSpec(causal=True))
    assert spec.normalize == "segmented" and not spec.causal and spec.allow.shape == (3, 2)
    assert spec.q_groups[0, 0] == 2 and (spec.q_groups[:, 1:3] == 1).all() and (spec.k_groups[:, 1:3] == 1).all()
    assert tuple(spec.segment_gate.shape) == (3, 2, state.x.shape[1], 2)
    assert torch.equal(spec.k_lengths, inputs.tokens.argmax(-1) + 1)
    assert state.batch_types[0, 1] == int(TokenType.CTX)
    # bit packing: key m of the subset group <-> bit m % 64 of word m // 64 (bit 63 is the sign bit)
    allowed = torch.zeros(1, 1, 70, dtype=torch.bool)
    allowed[0, 0, [0, 63, 64, 69]] = True
    words = pack_bits(allowed)
    assert words.shape == (1, 1, 2) and words[0, 0, 0] == (1 | -(2**63)) and words[0, 0, 1] == (1 | 1 << 5)


def test_gradients_reach_prompts_and_gates_only(clip):
    learner = make(clip, n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2)
    assert set(learner.gate_logits) == {"vision", "text"} and learner.gate_logits["vision"].shape == (3, 2, 2)
    inputs = learner.text_inputs(CLASSES)
    text = clip.encode_text(inputs.tokens, [learner], inputs.embeds, normalize=True)
    image = clip.encode_image(torch.randn(2, 3, 32, 32), [learner], normalize=True)
    F.cross_entropy(100 * image @ text.t(), torch.tensor([0, 1])).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())


def test_argument_checks():
    assert isinstance(create("dpl", gate="exact"), DPL)
    with pytest.raises(ValueError, match="gate"):
        DPL(gate="sometimes")
    with pytest.raises(ValueError, match="text_mode"):
        DPL(text_mode="bidirectional")
    with pytest.raises(ValueError, match="at least one"):
        DPL(p2i=False, p2p=False)
