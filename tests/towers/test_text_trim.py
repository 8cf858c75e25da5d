"""The text towers run only up to the batch's longest prompt (``trim_text``), and that is exact.

Each case encodes the same inputs twice, with the runner's ``trim`` on and off (the full context,
as open_clip and transformers run it), and compares the L2-normalised text features (fp32, 1e-6)
and, for learned text paths, the gradients of every learned tensor. A probe hook records the
sequence length the blocks ran at, so a runner that silently stops trimming fails the test.
Both towers: open_clip's causal text transformer (context 77) and the HF BERT tower
(all-MiniLM-L6-v2, key padding, mean pooling, context 32) that the quickstart uses through
open_clip's ``HFTextEncoder``.

Every registered learner that acts on the text tower is checked (``check_text_trim``, the suite a
new learner runs through with no edit here): built with its defaults, on tiny towers of both kinds
deep enough for every default prompt depth (``DEEP``), it is exact, or it declares
``needs_full_text`` and the runner keeps the full context. ``VARIANTS`` adds settings of the
shipped learners whose paths their defaults do not take.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from tests.helpers import minilm_path, tiny_clip_cfg
from tests.registries import text_learners
from vlm.backbones import ClipBackbone
from vlm.context import Tower, TowerContext
from vlm.hooks import TowerHook
from vlm.prompts import create
from vlm.prompts.base import PromptLearner, TextInputs
from vlm.tokens import TokenState, TokenType

TOL = dict(atol=1e-6, rtol=0.0)
CLASSES = ["cat", "sea_lion", "golden retriever dog sitting on the grass"]
#: Blocks per tower of the deep tiny towers: ViT-B/16's 12, the model every default prompt depth
#: of the shipped learners is written for (a learner whose default is deeper fails its build here).
DEEP = 12


class LengthProbe(TowerHook):
    """Records the text sequence length the blocks run at."""

    towers = (Tower.TEXT,)

    def __init__(self, full: bool = False) -> None:
        super().__init__()
        self.needs_full_text = full
        self.lengths: list[int] = []

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        self.lengths.append(state.x.shape[1])
        return state


def small_open_clip() -> ClipBackbone:
    """The tiny CLIP (2 blocks per tower, text context 77)."""
    torch.manual_seed(0)
    return ClipBackbone("tiny", model_cfg=tiny_clip_cfg())


def small_hf() -> ClipBackbone:
    """The tiny CLIP vision tower with the pretrained all-MiniLM-L6-v2 text tower (context 32)."""
    cfg = tiny_clip_cfg()
    cfg["text_cfg"] = {"hf_model_name": str(minilm_path()), "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}
    cfg["text_cfg"]["context_length"] = 32  # padded to 32 (not 77) keeps the 6-layer tower's full runs short
    torch.manual_seed(0)
    return ClipBackbone("tiny-hf", model_cfg=cfg)


@pytest.fixture(scope="module")
def open_clip_bb() -> ClipBackbone:
    return small_open_clip()


@pytest.fixture(scope="module")
def hf_bb() -> ClipBackbone:
    return small_hf()


@pytest.fixture(params=["open_clip", "hf"])
def bb(request, open_clip_bb, hf_bb) -> ClipBackbone:
    return open_clip_bb if request.param == "open_clip" else hf_bb


def deep_open_clip() -> ClipBackbone:
    """The tiny CLIP with ``DEEP`` blocks in both towers."""
    cfg = tiny_clip_cfg(layers=DEEP)
    cfg["text_cfg"]["layers"] = DEEP
    torch.manual_seed(0)
    return ClipBackbone("tiny-deep", model_cfg=cfg)


def deep_hf(folder: Path) -> ClipBackbone:
    """A random BERT text tower of ``DEEP`` narrow layers with all-MiniLM-L6-v2's tokenizer (its
    files copied into ``folder``, the config narrowed and deepened; no weights are read), and a
    vision tower of ``DEEP`` blocks."""
    for f in minilm_path().iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    config = json.loads((minilm_path() / "config.json").read_text())
    config.update(num_hidden_layers=DEEP, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    (folder / "config.json").write_text(json.dumps(config))
    cfg = tiny_clip_cfg(layers=DEEP)
    cfg["text_cfg"] = {"hf_model_name": str(folder), "hf_model_pretrained": False, "hf_pooler_type": "mean_pooler",
                       "hf_proj_type": "linear", "context_length": 32}  # fmt: skip
    torch.manual_seed(0)
    return ClipBackbone("tiny-hf-deep", model_cfg=cfg)


@pytest.fixture(scope="module")
def deep_open_clip_bb() -> ClipBackbone:
    return deep_open_clip()


@pytest.fixture(scope="module")
def deep_hf_bb(tmp_path_factory) -> ClipBackbone:
    return deep_hf(tmp_path_factory.mktemp("deep_hf"))


@pytest.fixture(params=["open_clip", "hf"])
def deep_bb(request, deep_open_clip_bb, deep_hf_bb) -> ClipBackbone:
    return deep_open_clip_bb if request.param == "open_clip" else deep_hf_bb


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
        assert params, f"{type(learner).__name__} has no learned tensor"
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


#: Settings of the shipped learners that take paths their defaults do not (class-token position,
#: class-specific context, DPL's text modes, DAPT's background slicing), on the small towers. A new
#: learner needs no entry: ``test_every_text_learner_with_its_defaults`` runs it.
VARIANTS = {
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


def text_inputs(bb: ClipBackbone, learner: PromptLearner) -> TextInputs:
    """The learner's text inputs for ``CLASSES``, or the frozen prompts when it has none."""
    inputs = learner.text_inputs(CLASSES)
    return inputs if inputs is not None else TextInputs(bb.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]))


def check_text_trim(bb: ClipBackbone, name: str, kwargs: Optional[dict] = None) -> PromptLearner:
    """The text-trim suite for the registered learner ``name`` (built with ``kwargs``, default: its
    defaults): the trimmed and the full-length run give the same features and gradients, and the
    trimmed run really ran shorter, by the cut; a learner that declares ``needs_full_text`` runs
    the full context both times. Returns the learner (built on ``bb``)."""
    kwargs = dict(kwargs or {})
    probe = LengthProbe()

    def encode(learner: PromptLearner) -> torch.Tensor:
        inputs = text_inputs(bb, learner)
        return bb.encode_text(inputs.tokens, [learner, probe], inputs.embeds, normalize=True)

    learner = build(bb, name, kwargs)
    assert Tower.TEXT in learner.towers, f"{name} does not act on the text tower"
    assert_same_features(bb, lambda: encode(learner))
    tokens = text_inputs(bb, learner).tokens
    full, cut = tokens.shape[1], bb.text.prefix_length(tokens)
    trimmed, untrimmed = probe.lengths
    if learner.needs_full_text:
        assert trimmed == untrimmed, f"{name} needs the full text but the runner cut it"
    else:
        assert cut is not None and cut < full, "the prompts must leave padding to cut"
        assert untrimmed - trimmed == full - cut, (name, probe.lengths, cut, full)
    assert_same_gradients(bb, lambda: build(bb, name, kwargs), encode)
    return learner


@pytest.mark.parametrize("case", list(VARIANTS))
def test_learned_text_paths_match_the_full_length_run(bb, case):
    name, kwargs = VARIANTS[case]
    learner = check_text_trim(bb, name, kwargs)
    tokens = learner.text_inputs(CLASSES).tokens
    assert bb.text.prefix_length(tokens) < tokens.shape[1] and not learner.needs_full_text
    if name == "dapt":  # its background rows: the deep prompts of the class rows apply there too
        words = learner.loss_background_words()
        assert_same_features(bb, lambda: learner.background_features(words, bb))
        assert_same_gradients(bb, lambda: build(bb, name, kwargs), lambda m: m.background_features(words, bb))


@pytest.mark.parametrize("name", text_learners())
def test_every_text_learner_with_its_defaults_is_exact_or_keeps_the_full_text(deep_bb, name):
    """Every registered learner that acts on the text tower (the registry's list: a new one joins
    with no edit here), as configured by default, on towers deep enough for its default depths."""
    check_text_trim(deep_bb, name)


def test_disa_frozen_ensemble_matches_the_full_length_run(bb):
    learner = build(bb, "disa", {"depth_text": 2, "depth_vision": 2, "sr_templates": ["a photo of a {}.", "itap of the {}."]})

    def ensemble() -> torch.Tensor:
        learner._ensemble_cache.clear()
        return learner.ensemble_text_features(CLASSES, bb)

    assert_same_features(bb, ensemble)


def test_the_text_learners_come_from_the_registry():
    """The list the suite runs over is the registry's, not empty, and holds the shipped text
    learners (a guard against a derivation that silently finds nothing)."""
    names = text_learners()
    assert {"coop", "ivlp", "maple", "dpl", "dapt", "disa"} <= set(names)
    assert all(Tower.TEXT in create(n).towers for n in names)
