"""Hugging Face CLIPModel / SiglipModel / Siglip2Model run block by block (HFClipBackbone).

With no hooks the backbone reproduces the model's own ``get_image_features`` and
``get_text_features`` (fp32, 1e-5), with padded batches; the CLIP text tower's trim is exact; the
SigLIP pooling head reads the tower's own tokens only; and prompt learners train through
``CLIPClassifier`` on both. Tiny random models, built here; no downloads (CLIP uses open_clip's
BPE, or an HF tokenizer written from it; SigLIP a word-level tokenizer defined below).
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from transformers import CLIPTokenizer

from vlm.backbones import HFClipBackbone
from vlm.modules import CLIPClassifier
from vlm.prompts import create
from vlm.tokens import TokenState, TokenType

TOL = dict(atol=1e-5, rtol=1e-5)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
EOT = 49407  # open_clip's and OpenAI CLIP's end-of-text id
CLASSES = ["cat", "sea_lion", "golden retriever dog"]
PROMPTS = ["a photo of a cat.", "dog", "a tiny photo of the golden retriever dog on the grass"]


def clip_config(eos_token_id: int = EOT) -> dict:
    """``eos_token_id=2``: a config written before transformers pooled at the first EOS (argmax)."""
    text = {**TEXT, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": eos_token_id}
    return {"model_type": "clip", "projection_dim": 16, "text_config": text, "vision_config": {**VISION, "image_size": 32}}


def siglip_config(version: int = 1) -> dict:
    text = {**TEXT, "vocab_size": 100, "max_position_embeddings": 16, "projection_size": VISION["hidden_size"]}
    if version == 1:
        return {"model_type": "siglip", "text_config": text, "vision_config": {**VISION, "image_size": 32}}
    return {"model_type": "siglip2", "text_config": text, "vision_config": {**VISION, "num_patches": 16}}


class WordTokenizer:
    """SigLIP's layout on a word-level vocabulary: words and punctuation marks, then EOS (id 1), padded with EOS to the
    context (16); ``bos=True`` starts every row with a BOS (id 2), as Gemma-style tokenizers do."""

    eos_token_id = pad_token_id = 1

    def __init__(self, bos: bool = False) -> None:
        self.bos_token_id = 2 if bos else None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), 16), self.pad_token_id, dtype=torch.long)
        start = [] if self.bos_token_id is None else [self.bos_token_id]
        for i, text in enumerate(texts):
            ids = start + [3 + zlib.crc32(w.encode()) % 97 for w in re.findall(r"\w+|[^\w\s]", text.lower())]
            ids = ids[:15] + [self.eos_token_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def build(config: dict, tokenizer, seed: int = 0) -> HFClipBackbone:
    torch.manual_seed(seed)
    return HFClipBackbone("tiny", config=config, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def clip() -> HFClipBackbone:
    return build(clip_config(), "open_clip")


@pytest.fixture(scope="module")
def siglip() -> HFClipBackbone:
    return build(siglip_config(1), WordTokenizer())  # SigLIP's own layout: no start token


def hf_padding(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip pads with 0 after EOT; the HF CLIP tokenizer pads with EOT and gives a mask."""
    pos = torch.arange(tokens.shape[1])[None]
    eot = (tokens == EOT).int().argmax(-1, keepdim=True)
    return torch.where(pos > eot, EOT, tokens), (pos <= eot).long()


@pytest.mark.parametrize("eos_token_id", [EOT, 2], ids=["eos", "legacy_argmax"])
def test_clip_matches_get_features(clip, eos_token_id):
    bb = clip if eos_token_id == EOT else build(clip_config(eos_token_id), "open_clip")
    images = torch.randn(3, 3, 32, 32)
    tokens = bb.tokenize(PROMPTS + ["x " * 100])  # padded rows and one truncated to the full context
    hf_tokens, mask = hf_padding(tokens)
    m = bb.model
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), m.get_image_features(pixel_values=images).pooler_output, **TOL)
        torch.testing.assert_close(bb.encode_text(tokens), m.get_text_features(input_ids=tokens).pooler_output, **TOL)
        ref = m.get_text_features(input_ids=hf_tokens, attention_mask=mask).pooler_output
        torch.testing.assert_close(bb.encode_text(hf_tokens), ref, **TOL)
    assert bb.logit_bias is None and bb.logit_scale is m.logit_scale
    assert (bb.image_size, bb.patches_per_image, bb.embed_dim, bb.feature_dim) == (32, 16, 16, 16)


def test_clip_text_trim_is_exact(clip):
    tokens = clip.tokenize(PROMPTS)
    for padded in (tokens, hf_padding(tokens)[0]):
        with torch.no_grad():
            trimmed = clip.text(padded)
            clip.text.trim = False
            try:
                full = clip.text(padded)
            finally:
                clip.text.trim = True
        assert trimmed.state.x.shape[1] == int((padded == EOT).int().argmax(-1).max()) + 1 < full.state.x.shape[1] == 77
        torch.testing.assert_close(trimmed.pooled, full.pooled, **TOL)


def test_clip_local_folder_with_its_own_hf_tokenizer(clip, tmp_path):
    """A ``save_pretrained`` folder (weights + an HF CLIPTokenizer written from open_clip's BPE)
    loads with its own tokenizer: open_clip's ids up to the padding, and the same features."""
    bpe = clip.tokenizer
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    CLIPTokenizer(vocab=vocab, merges=sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)).save_pretrained(tmp_path)
    clip.model.save_pretrained(tmp_path)
    bb = HFClipBackbone(str(tmp_path))
    assert bb.identity()["tokenizer"] == str(tmp_path) and bb.checksum() == clip.checksum()
    tokens, reference = bb.tokenize(PROMPTS), clip.tokenize(PROMPTS)
    assert torch.equal(tokens, hf_padding(reference)[0])
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(tokens), clip.encode_text(reference), **TOL)


@pytest.mark.parametrize("version", [1, 2], ids=["siglip", "siglip2"])
def test_siglip_matches_get_features(version):
    bb = build(siglip_config(version), WordTokenizer())
    images = torch.randn(2, 3, 32, 32)
    tokens = bb.tokenize(PROMPTS)
    assert (tokens[:, -1] == 1).all() and (tokens[0, 1:] != 1).any(), "padded to the context, EOS/pad last"
    m = bb.model
    kwargs = {"pixel_values": images}
    if version == 2:  # one full 4x4 grid per image, as Siglip2's processor gives for a square image
        kwargs = {"pixel_values": bb.vision.patchify(images), "pixel_attention_mask": torch.ones(2, 16, dtype=torch.long),
                  "spatial_shapes": torch.tensor([[4, 4], [4, 4]])}  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), m.get_image_features(**kwargs).pooler_output, **TOL)
        torch.testing.assert_close(bb.encode_text(tokens), m.get_text_features(input_ids=tokens).pooler_output, **TOL)
    assert bb.logit_bias is m.logit_bias and bb.mean == bb.std == (0.5, 0.5, 0.5)
    assert bb.image_size == 32 and bb.patches_per_image == 16 and bb.family == f"hf_siglip{'' if version == 1 else 2}"


def test_siglip_text_types_and_no_trim(siglip):
    types = siglip.text.token_types(siglip.tokenize(["a cat", "x " * 20]))  # SigLIP's own layout: no start token
    assert types[0, :4].tolist() == [TokenType.TEXT, TokenType.TEXT, TokenType.EOT, TokenType.PAD]
    assert (types[1, :-1] == TokenType.TEXT).all() and types[1, -1] == TokenType.EOT  # truncated: EOS kept last
    with_bos = build(siglip_config(1), WordTokenizer(bos=True))
    assert with_bos.text.token_types(with_bos.tokenize(["a cat"]))[0, :2].tolist() == [TokenType.SOS, TokenType.TEXT]
    assert siglip.text.prefix_length(siglip.tokenize(["a"])) is None


def test_siglip_pooling_head_reads_only_the_towers_tokens(siglip):
    """Inserted prompt tokens and padding never reach the attention-pooling head."""
    torch.manual_seed(1)
    x = torch.randn(2, 16, 64)
    state = TokenState.create(x, torch.full((16,), int(TokenType.PATCH)))
    with torch.no_grad():
        ref = siglip.vision.pool(state)
        prompted = state.insert(3, torch.randn(1, 4, 64) * 10, TokenType.PROMPT)
        torch.testing.assert_close(siglip.vision.pool(prompted), ref, **TOL)
        padded = TokenState.create(torch.cat([x, torch.randn(2, 5, 64) * 10], 1), torch.full((21,), int(TokenType.PATCH)),
                                   lengths=torch.tensor([16, 16]))  # fmt: skip
        torch.testing.assert_close(siglip.vision.pool(padded), ref, **TOL)


def one_step(backbone: HFClipBackbone, name: str, **kwargs) -> None:
    """One training step of ``CLIPClassifier`` with learner ``name``: finite loss, every learned
    tensor gets a gradient and moves."""
    torch.manual_seed(0)
    model = CLIPClassifier(backbone, create(name, **kwargs), classnames=CLASSES)
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert learned and all(n.startswith("prompt_learner.") for n in learned)
    before = {n: p.detach().clone() for n, p in learned.items()}
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    model.train()
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in learned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    torch.optim.SGD(learned.values(), lr=1.0).step()
    assert all(not torch.equal(before[n], p) for n, p in learned.items())


@pytest.mark.parametrize("name,kwargs", [("coop", {"n_ctx": 2}), ("maple", {"n_ctx": 2, "depth": 2})])
def test_clip_prompt_learners_train(clip, name, kwargs):
    one_step(clip, name, **kwargs)


@pytest.mark.parametrize(
    "name,kwargs", [("coop", {"n_ctx": 2, "class_token_position": "middle"}), ("maple", {"n_ctx": 2, "depth": 2}),
                    ("ivlp", dict(n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2))]
)
def test_siglip_prompt_learners_train(siglip, name, kwargs):
    one_step(siglip, name, **kwargs)


@pytest.mark.parametrize("bos", [False, True])
def test_learned_context_sits_right_after_the_start_token_or_first(bos):
    """SigLIP's tokenizer has no start token: the context takes positions 0..n-1 (with one, 1..n),
    and the class name's embeddings follow it unchanged."""
    backbone = build(siglip_config(1), WordTokenizer(bos=bos))
    learner = create("coop", n_ctx=3)
    CLIPClassifier(backbone, learner, classnames=CLASSES)
    inputs = learner.text_inputs(CLASSES)
    frozen = backbone.text.token_embedding(inputs.tokens)
    s = int(bos)
    for row in inputs.embeds:
        assert torch.equal(row[s : s + 3], learner.ctx.detach())
    assert torch.equal(inputs.embeds[:, :s], frozen[:, :s]) and torch.equal(inputs.embeds[:, s + 3 :], frozen[:, s + 3 :])
    assert (inputs.tokens[:, 0] == 2).all() == bos


def test_refusals():
    with pytest.raises(ValueError, match="no tokenizer to load"):
        HFClipBackbone("tiny", config=clip_config())
    with pytest.raises(ValueError, match="CLIP's BPE"):
        HFClipBackbone("tiny", config=siglip_config(1), tokenizer="open_clip")
    with pytest.raises(ValueError, match="model_type"):
        HFClipBackbone("tiny", config={**clip_config(), "model_type": "bert"}, tokenizer="open_clip")
    headless = siglip_config(1)
    headless["vision_config"]["vision_use_head"] = False
    with pytest.raises(TypeError, match="vision_use_head"):
        HFClipBackbone("tiny", config=headless, tokenizer=WordTokenizer())
