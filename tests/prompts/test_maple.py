"""MaPLe (Khattak et al., CVPR 2023) against plain loops over the open_clip and HF blocks."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.helpers import minilm_path, tiny_clip_cfg
from tests.prompts import deep_reference as ref
from tests.prompts.test_ivlp import three_layer_clip
from vlm.backbones import ClipBackbone
from vlm.prompts import create
from vlm.prompts.maple import MaPLe

TOL = dict(atol=1e-5, rtol=1e-5)
CLASSES = ["cat", "sea_lion", "golden retriever dog"]


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    return three_layer_clip()


def make(bb: ClipBackbone, **kwargs) -> MaPLe:
    torch.manual_seed(1)
    learner = MaPLe(**kwargs)
    learner.build(bb)
    return learner


def coupled(learner: MaPLe) -> tuple[list, list]:
    """Text prompts P_0..P_{J-1} and vision prompts F_i(P_i) = W_i P_i + b_i (Eq. 8), by hand."""
    text = [learner.ctx] + list(learner.compound_text if learner.compound_text is not None else [])
    layers = [learner.proj] + list(learner.compound_proj or [])
    vision = [p @ lin.weight.t() + lin.bias for p, lin in zip(text, layers)]
    return text, vision


@pytest.mark.parametrize("n_ctx,depth,init", [(2, 2, "a photo of a"), (3, 3, None), (2, 1, "a photo of a")])
def test_features_match_plain_loops(clip, n_ctx, depth, init):
    learner = make(clip, n_ctx=n_ctx, depth=depth, ctx_init=init)
    prefix = "a photo of a" if init else " ".join(["X"] * n_ctx)
    tokens = ref.prompt_tokens(clip, CLASSES, prefix)
    inputs = learner.text_inputs(CLASSES)
    assert torch.equal(inputs.tokens, tokens)
    text_p, vision_p = coupled(learner)
    assert len(text_p) == depth
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(inputs.tokens, [learner], inputs.embeds), ref.clip_text(clip, tokens, text_p), **TOL)
        torch.testing.assert_close(clip.encode_image(images, [learner]), ref.clip_vision(clip, images, vision_p), **TOL)


def test_phrase_init_keeps_the_rest_of_the_phrase(clip):
    """b = 2 and "a photo of a": "a photo" is learned, "of a" stays as frozen tokens."""
    learner = make(clip, n_ctx=2, depth=1)
    ids = clip.tokenizer(["a photo of a"])[0]
    torch.testing.assert_close(learner.ctx.detach(), clip.model.token_embedding(ids[1:3]))
    inputs = learner.text_inputs(["cat"])
    torch.testing.assert_close(inputs.embeds[0, 3:5], clip.model.token_embedding(ids[3:5]))


def test_parameters_and_gradients(clip):
    learner = make(clip, n_ctx=2, depth=3)
    shapes = {k: tuple(v.shape) for k, v in learner.named_parameters()}
    assert shapes["ctx"] == (2, 64) and shapes["compound_text"] == (2, 2, 64) and shapes["proj.weight"] == (64, 64)
    assert len(learner.compound_proj) == 2
    inputs = learner.text_inputs(CLASSES)
    text = clip.encode_text(inputs.tokens, [learner], inputs.embeds, normalize=True)
    image = clip.encode_image(torch.randn(2, 3, 32, 32), [learner], normalize=True)
    F.cross_entropy(100 * image @ text.t(), torch.tensor([0, 2])).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # vision-only loss still trains the text prompts through the coupling (Eq. 8)
    learner.zero_grad()
    clip.encode_image(torch.randn(2, 3, 32, 32), [learner]).square().sum().backward()
    assert learner.ctx.grad.abs().sum() > 0 and learner.compound_text.grad[1].abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())


def test_hf_text_tower_matches_plain_loop():
    cfg = tiny_clip_cfg()
    cfg["text_cfg"] = {"hf_model_name": str(minilm_path()), "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 24}
    torch.manual_seed(0)
    bb = ClipBackbone("tiny-hf", model_cfg=cfg)
    learner = make(bb, n_ctx=2, depth=2)
    assert learner.ctx.shape == (2, 384) and learner.proj.weight.shape == (64, 384)
    tokens = ref.prompt_tokens(bb, CLASSES, "a photo of a")
    inputs = learner.text_inputs(CLASSES)
    assert torch.equal(inputs.tokens, tokens)
    text_p, vision_p = coupled(learner)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(inputs.tokens, [learner], inputs.embeds), ref.hf_text(bb, tokens, text_p), atol=2e-5, rtol=2e-5)
        images = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(bb.encode_image(images, [learner]), ref.clip_vision(bb, images, vision_p), **TOL)


def test_registry_and_depth_check(clip):
    assert isinstance(create("maple", depth=2), MaPLe)
    with pytest.raises(ValueError, match="depth"):
        make(clip, depth=4)


def test_deeper_couplings_start_as_clones_of_one_linear_as_released():
    """The released MaPLe (and DAPT) builds one coupling ``Linear`` and deep-copies it for the J-1
    deeper layers (``_get_clones``): they start identical but train as separate parameters."""
    bb = three_layer_clip()
    cloned = MaPLe(n_ctx=2, depth=3, ctx_init=None, coupling_init="cloned")
    cloned.build(bb)
    first, second = cloned.compound_proj
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.weight.data_ptr() != second.weight.data_ptr()
    independent = MaPLe(n_ctx=2, depth=3, ctx_init=None, coupling_init="independent")
    independent.build(bb)
    a, b = independent.compound_proj
    assert not torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="coupling_init"):
        MaPLe(coupling_init="shared")


def test_released_ctx_init_rule_learns_what_the_released_code_learns():
    """The released MaPLe uses ``ctx_init`` whenever ``n_ctx <= 4``: the context is the embedding of
    token positions 1..n of the tokenized phrase (with "a photo" and n = 3: "a", "photo", EOT), and
    the prompt "a photo <class>." has its slots 1..3 replaced, covering the class name's first
    token. ``"words"`` (default) falls back to random placeholders instead."""
    bb = three_layer_clip()
    emb = bb.text.token_embedding
    ids = bb.tokenize(["a photo"])[0]
    released = MaPLe(n_ctx=3, depth=1, ctx_init="a photo", ctx_init_rule="released")
    released.build(bb)
    assert torch.equal(released.ctx, emb(ids[1:4]).detach())
    assert released.prompt_prefix == "a photo"
    inputs = released.text_inputs(["cat"])
    plain = bb.tokenize(["a photo cat."])
    assert torch.equal(inputs.tokens, plain)
    expected = torch.cat([emb(plain[:, :1]), released.ctx[None], emb(plain[:, 4:])], dim=1)
    torch.testing.assert_close(inputs.embeds, expected)
    words = MaPLe(n_ctx=3, depth=1, ctx_init="a photo")
    words.build(bb)
    assert words.prompt_prefix == "X X X"
    long = MaPLe(n_ctx=5, depth=1, ctx_init="a photo of a", ctx_init_rule="released")
    long.build(bb)
    assert long.prompt_prefix == "X X X X X"  # n_ctx > 4: random context, as released
    with pytest.raises(ValueError, match="ctx_init_rule"):
        MaPLe(ctx_init_rule="official")
