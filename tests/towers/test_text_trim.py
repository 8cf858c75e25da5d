"""The text towers run only up to the batch's longest prompt (``trim_text``), and that is exact.

Each case encodes the same inputs twice, with the runner's ``trim`` on and off (the full context,
as open_clip and transformers run it), and compares the L2-normalised text features (fp32, 1e-6)
and, for learned text paths, the gradients of every learned tensor. A probe hook records the
sequence length the blocks ran at, so a runner that silently stops trimming fails the test.
Both towers: open_clip's causal text transformer (context 77) and the HF BERT tower
(all-MiniLM-L6-v2, key padding, mean pooling, context 32) that the quickstart uses through
open_clip's ``HFTextEncoder``.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from tests.helpers import minilm_path, tiny_clip_cfg
from vlm.backbones import ClipBackbone
from vlm.hooks import TowerHook
from vlm.prompts import create
from vlm.prompts.base import PromptLearner
from vlm.tokens import TokenState, TokenType

TOL = dict(atol=1e-6, rtol=0.0)
CLASSES = ["cat", "sea_lion", "golden retriever dog sitting on the grass"]


class LengthProbe(TowerHook):
    """Records the text sequence length the blocks run at."""

    towers = ("text",)

    def __init__(self, full: bool = False) -> None:
        super().__init__()
        self.needs_full_text = full
        self.lengths: list[int] = []

    def on_tower_start(self, tower: str, state: TokenState) -> TokenState:
        self.lengths.append(state.x.shape[1])
        return state


@pytest.fixture(scope="module")
def open_clip_bb() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone("tiny", model_cfg=tiny_clip_cfg())


@pytest.fixture(scope="module")
def hf_bb() -> ClipBackbone:
    cfg = tiny_clip_cfg()
    cfg["text_cfg"] = {"hf_model_name": str(minilm_path()), "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}
    cfg["text_cfg"]["context_length"] = 32  # padded to 32 (not 77) keeps the 6-layer tower's full runs short
    torch.manual_seed(0)
    return ClipBackbone("tiny-hf", model_cfg=cfg)


@pytest.fixture(params=["open_clip", "hf"])
def bb(request, open_clip_bb, hf_bb) -> ClipBackbone:
    return open_clip_bb if request.param == "open_clip" else hf_bb


def run_both(bb: ClipBackbone, encode: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode()`` with the runner trimming and at the full context length."""
    out = []
    for trim in (True, False):
        bb.text.trim = trim
        try:
            out.append(encode())
        finally:
            bb.text.trim = True
    return out[0], out[1]


def assert_same_features(bb: ClipBackbone, encode: Callable[[], torch.Tensor]) -> None:
    """fp32 features of the trimmed and the full-length run agree to 1e-6 (they are L2-normalised)."""
    with torch.no_grad():
        trimmed, full = run_both(bb, encode)
    torch.testing.assert_close(trimmed, full, **TOL)


def assert_same_gradients(bb: ClipBackbone, make: Callable[[], PromptLearner], encode: Callable[[PromptLearner], torch.Tensor]) -> None:
    """Gradients of every learned tensor agree between both runs, in float64 (where fp32 rounding,
    amplified through the backward of the norms, cannot hide a real difference)."""
    bb.double()
    try:
        learner = make()
        params = [p for p in learner.parameters() if p.requires_grad]
        grads = []
        for feats in run_both(bb, lambda: encode(learner)):
            weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(0), dtype=feats.dtype)
            grads.append(torch.autograd.grad((feats * weights).sum(), params, allow_unused=True))
    finally:
        bb.float()
    assert any(g is not None for g in grads[0])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_frozen_text_features_and_cut(bb):
    tokens = bb.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    probe = LengthProbe()
    assert_same_features(bb, lambda: bb.encode_text(tokens, [probe], normalize=True))
    cut = bb.text.prefix_length(tokens)
    last_eot = int((bb.text.token_types(tokens) == int(TokenType.EOT)).nonzero()[:, 1].max())
    assert cut == last_eot + 1 < tokens.shape[1]  # the longest prompt of the batch
    assert probe.lengths == [cut, tokens.shape[1]]


def test_hook_that_needs_the_full_text_keeps_it(bb):
    tokens = bb.tokenize(["a photo of a cat."])
    probe = LengthProbe(full=True)
    with torch.no_grad():
        bb.encode_text(tokens, [probe])
    assert probe.lengths == [tokens.shape[1]] and bb.text.prefix_length(tokens) < tokens.shape[1]


@pytest.mark.parametrize("cfg", [{"no_causal_mask": True}, {"pool_type": "last"}], ids=["bidirectional", "last_pool"])
def test_open_clip_towers_that_read_every_position_are_not_cut(cfg):
    model_cfg = tiny_clip_cfg()
    model_cfg["text_cfg"].update(cfg)
    bb = ClipBackbone("tiny", model_cfg=model_cfg)
    tokens = bb.tokenize(["a cat", "a photo of a dog"])
    assert bb.text.prefix_length(tokens) is None
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(tokens), bb.model.encode_text(tokens), atol=1e-5, rtol=1e-5)


LEARNERS = {
    "coop_end": ("coop", {"n_ctx": 4}),
    "coop_front": ("coop", {"n_ctx": 4, "class_token_position": "front"}),
    "coop_csc_middle": ("coop", {"n_ctx": 4, "class_specific": True, "num_classes": 3, "class_token_position": "middle"}),
    "ivlp": ("ivlp", {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 2, "depth_vision": 2}),
    "maple": ("maple", {"n_ctx": 2, "depth": 2}),
    "dpl_conditioned": ("dpl", {"depth_text": 2, "depth_vision": 2, "text_mode": "language_conditioned"}),
    "dpl_causal_exact": ("dpl", {"depth_text": 2, "depth_vision": 2, "text_mode": "causal", "gate": "exact"}),
    "dapt": ("dapt", {"depth": 2, "bg_slicing": "official"}),
    "disa": ("disa", {"depth_text": 2, "depth_vision": 2}),
}


def build(bb: ClipBackbone, name: str, kwargs: dict) -> PromptLearner:
    torch.manual_seed(1)
    learner = create(name, **kwargs)
    learner.build(bb)
    for p in learner.parameters():  # random deep prompts and gates, so every path carries signal
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    return learner.train()


@pytest.mark.parametrize("case", list(LEARNERS))
def test_learned_text_paths_match_the_full_length_run(bb, case):
    name, kwargs = LEARNERS[case]
    probe = LengthProbe()

    def encode(learner: PromptLearner) -> torch.Tensor:
        inputs = learner.text_inputs(CLASSES)
        return bb.encode_text(inputs.tokens, [learner, probe], inputs.embeds, normalize=True)

    learner = build(bb, name, kwargs)
    assert_same_features(bb, lambda: encode(learner))
    tokens = learner.text_inputs(CLASSES).tokens
    cut = bb.text.prefix_length(tokens)
    assert probe.lengths == [cut, tokens.shape[1]] and cut < tokens.shape[1]
    assert_same_gradients(bb, lambda: build(bb, name, kwargs), encode)
    if name == "dapt":  # its background rows: the deep prompts of the class rows apply there too
        words = learner.loss_background_words()
        assert_same_features(bb, lambda: learner.background_features(words))
        assert_same_gradients(bb, lambda: build(bb, name, kwargs), lambda m: m.background_features(words))


def test_disa_frozen_ensemble_matches_the_full_length_run(bb):
    learner = build(bb, "disa", {"depth_text": 2, "depth_vision": 2, "sr_templates": ["a photo of a {}.", "itap of the {}."]})

    def ensemble() -> torch.Tensor:
        learner._ensemble_cache.clear()
        return learner.ensemble_text_features(CLASSES)

    assert_same_features(bb, ensemble)


def test_every_text_learner_is_shown_exact_or_keeps_the_full_text():
    """A registered learner that acts on the text tower either is in ``LEARNERS`` (exact above: its
    context replaces positions 1..b, before EOT, and deep text prompts replace the same slots) or
    declares ``needs_full_text`` (it reads or writes positions past the cut, e.g. appends tokens)."""
    from vlm import prompts

    covered = {name for name, _ in LEARNERS.values()}
    text_learners = [n for n in prompts.available() if "text" in create(n).towers]
    assert {"coop", "ivlp", "maple", "dpl", "dapt", "disa"} <= set(text_learners)
    for name in text_learners:
        assert name in covered or create(name).needs_full_text, f"{name}: no exactness test and needs_full_text is False"
