"""IVLP (MaPLe paper's independent V-L prompting) against plain loops over the open_clip blocks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_clip_cfg
from tests.prompts import deep_reference as ref
from vlm.backbones import ClipBackbone
from vlm.context import Tower
from vlm.prompts import create
from vlm.prompts.ivlp import IVLP
from vlm.tokens import TokenType

TOL = dict(atol=1e-5, rtol=1e-5)
CLASSES = ["cat", "sea_lion", "golden retriever dog"]


def three_layer_clip() -> ClipBackbone:
    """Tiny CLIP with 3 blocks per tower (so depth 2 leaves one block without new prompts)."""
    cfg = tiny_clip_cfg(layers=3)
    cfg["text_cfg"].update(layers=3, context_length=24)
    torch.manual_seed(0)
    return ClipBackbone("tiny3", model_cfg=cfg)


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    return three_layer_clip()


def make(bb: ClipBackbone, **kwargs) -> IVLP:
    torch.manual_seed(1)
    learner = IVLP(**kwargs)
    learner.build(bb)
    return learner


def layer_list(first: torch.Tensor, deep) -> list:
    return [first] + ([] if deep is None else list(deep))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_ctx_text=2, n_ctx_vision=3, depth_text=2, depth_vision=3, ctx_init="a photo of a"),
        dict(n_ctx_text=4, n_ctx_vision=2, depth_text=3, depth_vision=1, ctx_init=None),
        dict(n_ctx_text=5, n_ctx_vision=0, depth_text=1, depth_vision=0, ctx_init="a photo of a"),
    ],
    ids=["phrase-2", "random-4", "language-only-5"],
)
def test_features_match_plain_loops(clip, kwargs):
    learner = make(clip, **kwargs)
    inputs = learner.text_inputs(CLASSES)
    n = kwargs["n_ctx_text"]
    phrase = kwargs["ctx_init"] is not None and n <= 4
    prefix = "a photo of a" if phrase else " ".join(["X"] * n)
    tokens = ref.prompt_tokens(clip, CLASSES, prefix)
    assert torch.equal(inputs.tokens, tokens)
    if phrase:  # initialised from the first n token embeddings of the phrase
        ids = clip.tokenizer(["a photo of a"])[0, 1 : 1 + n]
        torch.testing.assert_close(learner.ctx.detach(), clip.model.token_embedding(ids))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = clip.encode_text(inputs.tokens, [learner], inputs.embeds)
        want_text = ref.clip_text(clip, tokens, layer_list(learner.ctx, learner.text_deep))
        torch.testing.assert_close(text, want_text, **TOL)
        image = clip.encode_image(images, [learner])
        vis = [] if learner.vision_ctx is None else layer_list(learner.vision_ctx, learner.vision_deep)
        torch.testing.assert_close(image, ref.clip_vision(clip, images, vis), **TOL)
    if kwargs["n_ctx_vision"] == 0:
        assert learner.towers == (Tower.TEXT,)
        torch.testing.assert_close(image, clip.encode_image(images), **TOL)


def test_parameter_shapes_and_types(clip):
    learner = make(clip, n_ctx_text=2, n_ctx_vision=3, depth_text=3, depth_vision=2)
    shapes = {k: tuple(v.shape) for k, v in learner.named_parameters()}
    assert shapes == {"ctx": (2, 64), "text_deep": (2, 2, 64), "vision_ctx": (3, 64), "vision_deep": (1, 3, 64)}
    state = clip.run_vision(torch.randn(1, 3, 32, 32), [learner]).state
    assert state.batch_types[0, -3:].eq(int(TokenType.PROMPT)).all() and state.positions[0, -3:].eq(-1).all()
    inputs = learner.text_inputs(CLASSES)
    tstate = clip.text(inputs.tokens, [learner], inputs.embeds).state
    assert tstate.batch_types[:, 1:3].eq(int(TokenType.CTX)).all()


def test_gradient_reaches_only_prompts(clip):
    learner = make(clip, n_ctx_text=2, n_ctx_vision=2, depth_text=3, depth_vision=3)
    inputs = learner.text_inputs(CLASSES)
    text = clip.encode_text(inputs.tokens, [learner], inputs.embeds, normalize=True)
    image = clip.encode_image(torch.randn(2, 3, 32, 32), [learner], normalize=True)
    (image @ text.t()).square().sum().backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.flatten(1 if p.dim() == 3 else 0).abs().amax(-1).gt(0).all(), name
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())


def test_registry_errors_and_build_checks(clip):
    assert isinstance(create("ivlp", depth_text=2, depth_vision=2), IVLP)
    with pytest.raises(ValueError, match="depth"):
        make(clip, depth_text=4, depth_vision=2)
    with pytest.raises(ValueError):
        IVLP(n_ctx_vision=0, depth_vision=2)
    with pytest.raises(RuntimeError, match="build"):
        clip.encode_image(torch.randn(1, 3, 32, 32), [IVLP(depth_text=2, depth_vision=2)])
