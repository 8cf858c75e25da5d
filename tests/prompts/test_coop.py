"""CoOp (Zhou et al., IJCV 2022) against a hand-written CoOp text encoder on tiny towers."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import minilm_path, tiny_clip_cfg
from vlm.backbones import ClipBackbone
from vlm.prompts import TextInputs
from vlm.prompts.coop import CoOp

TOL = dict(atol=1e-5, rtol=1e-5)
CLASSES = ["cat", "sea_lion", "golden retriever dog"]
CONTEXT = 24  # a short text context keeps the tests fast; nothing here depends on 77


def short_context(cfg: dict) -> dict:
    cfg["text_cfg"]["context_length"] = CONTEXT
    return cfg


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone("tiny", model_cfg=short_context(tiny_clip_cfg()))


@pytest.fixture(scope="module")
def clip_hf() -> ClipBackbone:
    cfg = tiny_clip_cfg()
    cfg["text_cfg"] = {"hf_model_name": str(minilm_path()), "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}
    torch.manual_seed(0)
    return ClipBackbone("tiny-hf", model_cfg=short_context(cfg))


def make(bb: ClipBackbone, **kwargs) -> CoOp:
    torch.manual_seed(1)
    learner = CoOp(**kwargs)
    learner.build(bb)
    return learner


def reference_prompts(bb: ClipBackbone, ctx: torch.Tensor, n_ctx: int, prefix: str, position: str) -> tuple:
    """CoOp's PromptLearner.forward, written out: token_prefix / ctx / token_suffix concatenation."""
    names = [c.replace("_", " ") for c in CLASSES]
    tokens = bb.tokenizer([f"{prefix} {n}." for n in names])
    emb = bb.model.token_embedding(tokens)
    token_prefix, token_suffix = emb[:, :1], emb[:, 1 + n_ctx :]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(len(names), -1, -1)
    if position == "end":
        return tokens, torch.cat([token_prefix, ctx, token_suffix], dim=1)
    name_lens = [len(bb.tokenizer.encode(n)) for n in names]
    half = n_ctx // 2
    prompts = []
    for i, k in enumerate(name_lens):
        pre, c = token_prefix[i : i + 1], ctx[i : i + 1]
        cls_i, suf = token_suffix[i : i + 1, :k], token_suffix[i : i + 1, k:]
        if position == "middle":
            prompts.append(torch.cat([pre, c[:, :half], cls_i, c[:, half:], suf], dim=1))
        else:
            prompts.append(torch.cat([pre, cls_i, c, suf], dim=1))
    return tokens, torch.cat(prompts, dim=0)


def reference_text_encoder(bb: ClipBackbone, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CoOp's TextEncoder: + positional embedding, causal transformer, ln_final, EOT (argmax), projection."""
    m = bb.model
    x = prompts + m.positional_embedding
    x = m.transformer(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ m.text_projection


def learner_features(bb: ClipBackbone, learner: CoOp) -> torch.Tensor:
    inputs = learner.text_inputs(CLASSES)
    assert isinstance(inputs, TextInputs)
    return bb.encode_text(inputs.tokens, embeds=inputs.embeds)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
def test_matches_reference_text_encoder(clip, position, csc):
    learner = make(clip, n_ctx=4, class_specific=csc, num_classes=len(CLASSES), class_token_position=position)
    assert learner.ctx.shape == ((len(CLASSES), 4, 64) if csc else (4, 64))
    with torch.no_grad():
        learner.ctx.normal_()  # far from the N(0, 0.02) init, so a misplaced slot cannot hide
        tokens, prompts = reference_prompts(clip, learner.ctx, 4, "X X X X", position)
        ref = reference_text_encoder(clip, prompts, tokens)
        torch.testing.assert_close(learner_features(clip, learner), ref, **TOL)
        inputs = learner.text_inputs(CLASSES)
        torch.testing.assert_close(inputs.embeds, prompts, atol=0, rtol=0)
        # token ids follow the rearranged embeddings; the EOT/pooling position does not move
        assert torch.equal(inputs.tokens.argmax(-1), tokens.argmax(-1))


def test_init_is_normal_002(clip):
    learner = make(clip, n_ctx=16)
    assert learner.ctx.shape == (16, 64)
    ctx = learner.ctx.detach()
    assert abs(float(ctx.std()) - 0.02) < 0.004 and abs(float(ctx.mean())) < 0.004


def test_ctx_init_uses_phrase_token_embeddings(clip):
    learner = make(clip, ctx_init="a photo of a", class_token_position="end")
    assert learner.n_ctx == 4
    ids = clip.tokenizer(["a photo of a"])
    torch.testing.assert_close(learner.ctx.detach(), clip.model.token_embedding(ids)[0, 1:5], atol=0, rtol=0)
    assert learner.prompt_texts(["sea_lion"]) == ["a photo of a sea lion."]
    with torch.no_grad():
        # before training, CoOp initialised from "a photo of a" is zero-shot CLIP with that template
        zero_shot = clip.model.encode_text(clip.tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]))
        torch.testing.assert_close(learner_features(clip, learner), zero_shot, **TOL)
        learner.ctx.add_(torch.randn_like(learner.ctx))
        tokens, prompts = reference_prompts(clip, learner.ctx, 4, "a photo of a", "end")
        ref = reference_text_encoder(clip, prompts, tokens)
        torch.testing.assert_close(learner_features(clip, learner), ref, **TOL)


def test_ctx_init_class_specific_and_n_ctx_mismatch(clip):
    learner = make(clip, ctx_init="a photo of a", class_specific=True, num_classes=3)
    assert learner.ctx.shape == (3, 4, 64) and torch.equal(learner.ctx[0], learner.ctx[2])
    with pytest.raises(ValueError, match="n_ctx"):
        make(clip, ctx_init="a photo of a", n_ctx=8)


def test_only_ctx_is_trained_and_cache_stays_out_of_state_dict(clip):
    learner = make(clip, n_ctx=4, class_token_position="middle")
    feats = learner_features(clip, learner)
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]
    assert list(learner.state_dict()) == ["ctx"]
    feats.square().sum().backward()
    assert learner.ctx.grad is not None and bool(learner.ctx.grad.abs().gt(0).all())
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    # tokenized once per class list
    first = learner.text_inputs(CLASSES)
    assert learner.text_inputs(CLASSES).tokens is first.tokens
    assert learner.text_inputs(CLASSES[:2]).tokens.shape[0] == 2


def test_errors(clip):
    with pytest.raises(ValueError, match="training classes"):
        make(clip, class_specific=True)  # neither bound classes nor num_classes
    with pytest.raises(ValueError, match="class_token_position"):
        CoOp(class_token_position="left")
    with pytest.raises(RuntimeError, match="build"):
        CoOp().text_inputs(CLASSES)
    csc = make(clip, n_ctx=2, class_specific=True, num_classes=3)
    with pytest.raises(ValueError, match="3 classes"):
        csc.text_inputs(["a", "b"])


def test_placeholder_position_is_checked(clip, monkeypatch):
    # a tokenizer that drops the start token puts the placeholders at 0..3
    monkeypatch.setattr(clip, "tokenize", lambda texts: torch.roll(clip.tokenizer(texts), -1, dims=1))
    learner = make(clip, n_ctx=4)
    with pytest.raises(ValueError, match="positions 1..4"):
        learner.text_inputs(CLASSES)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_hf_text_tower(clip_hf, position):
    """BERT tower ([CLS] at 0, padding 0): learner path equals HFTextEncoder fed the same CoOp embeddings."""
    enc = clip_hf.model.text
    tok = clip_hf.tokenizer
    learner = make(clip_hf, ctx_init="a photo of a", class_token_position=position)
    ids = tok(["a photo of a"])
    assert learner.n_ctx == 4
    phrase = enc.transformer.embeddings.word_embeddings(ids)[0, 1:5]
    torch.testing.assert_close(learner.ctx.detach(), phrase, atol=0, rtol=0)
    names = [c.replace("_", " ") for c in CLASSES]
    with torch.no_grad():
        if position == "end":  # at init this is the frozen tower on "a photo of a <class>."
            zero_shot = clip_hf.model.encode_text(tok([f"a photo of a {n}." for n in names]))
            torch.testing.assert_close(learner_features(clip_hf, learner), zero_shot, **TOL)
        learner.ctx.add_(torch.randn_like(learner.ctx))
        tokens = tok([f"a photo of a {n}." for n in names])
        emb = enc.transformer.embeddings.word_embeddings(tokens)
        c = learner.ctx.unsqueeze(0).expand(len(names), -1, -1)
        rows = []
        for i, n in enumerate(names):
            k = len(tok.tokenizer.tokenize(n))
            pre, cls_i, suf = emb[i : i + 1, :1], emb[i : i + 1, 5 : 5 + k], emb[i : i + 1, 5 + k :]
            ci = c[i : i + 1]
            parts = {
                "end": [pre, ci, cls_i, suf],
                "front": [pre, cls_i, ci, suf],
                "middle": [pre, ci[:, :2], cls_i, ci[:, 2:], suf],
            }
            rows.append(torch.cat(parts[position], dim=1))
        mask = (tokens != 0).long()
        out = enc.transformer(inputs_embeds=torch.cat(rows), attention_mask=mask)
        ref = enc.proj(enc.pooler(out, mask))
        torch.testing.assert_close(learner_features(clip_hf, learner), ref, **TOL)
        inputs = learner.text_inputs(CLASSES)
        assert torch.equal((inputs.tokens != 0).sum(-1), mask.sum(-1))


def test_class_specific_context_is_bound_to_the_training_classes(clip):
    """CSC contexts belong to their classes: sized from the bound class list (no num_classes), and
    refused, naming ``class_specific``, for any other list (e.g. base -> new of the same size)."""
    torch.manual_seed(1)
    csc = CoOp(n_ctx=2, class_specific=True)
    csc.bind_classes(CLASSES)
    csc.build(clip)
    assert csc.ctx.shape[0] == len(CLASSES)
    assert csc.text_inputs(CLASSES).embeds.shape[0] == len(CLASSES)
    other = ["dog", "truck", "tree"]  # same count, other classes
    with pytest.raises(ValueError, match="class_specific"):
        csc.text_inputs(other)
    with pytest.raises(ValueError, match="num_classes=2"):
        CoOp(n_ctx=2, class_specific=True, num_classes=2).bind_classes(CLASSES)
    shared = make(clip, n_ctx=2)
    shared.check_classes(other)  # a shared context transfers


def test_class_specific_base_to_new_test_is_refused_before_scoring(clip):
    import lightning as L

    from vlm.modules import CLIPClassifier

    csc = CoOp(n_ctx=2, class_specific=True)
    model = CLIPClassifier(clip, csc, classnames=CLASSES, test_classnames={"base": CLASSES, "new": ["dog", "truck", "tree"]})
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="class_specific"):
        model.setup("test")
    CLIPClassifier(clip, CoOp(n_ctx=2, class_specific=True), classnames=CLASSES, test_classnames={"base": CLASSES})
