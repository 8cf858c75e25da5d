"""DiSa (Alipour Talemi et al., KDD 2025) against plain references of its regularisers, tiny towers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from tests.datamodules.toydata import make_dataset
from tests.helpers import short_text_clip
from vlm.backbones import ClipBackbone
from vlm.datamodules import FewShotDataModule
from vlm.datamodules.transforms import build_test_transform
from vlm.modules import CLIPClassifier
from vlm.prompts.disa import DiSa

CLASSES = ["cat", "sea_lion", "owl"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    return short_text_clip()


def model(clip: ClipBackbone, **kwargs) -> CLIPClassifier:
    torch.manual_seed(1)
    learner = DiSa(depth_text=2, depth_vision=2, sr_templates=TEMPLATES, **kwargs)
    m = CLIPClassifier(clip, learner, classnames=CLASSES).train()
    learner.classnames = CLASSES
    learner.prototypes = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(5)), dim=-1)
    with torch.no_grad():  # move the prompts away from their init so prompted != frozen
        for p in learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(3, 3, 32, 32, generator=g), "label": torch.tensor([0, 2, 1])}


def test_frozen_pass_is_zero_shot_clip_exactly(clip):
    m, b = model(clip), batch()
    zero_shot = CLIPClassifier(clip, None, classnames=CLASSES, template=m.template)
    frozen = m.frozen_outputs(b["image"])
    ref = zero_shot(b["image"])["logits"]
    assert frozen["frozen_logits"].dtype == ref.dtype
    assert torch.equal(frozen["frozen_logits"], ref)
    assert not torch.equal(m(b["image"])["logits"], ref)  # the prompted pass differs
    assert DiSa.needs_frozen_pass


def manual_patch_tokens(clip: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
    """open_clip's vision tower written out to the projected patch tokens (MaskCLIP-style)."""
    v = clip.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(images), 1, -1), x], 1) + v.positional_embedding
    x = v.transformer(v.ln_pre(x))
    return v.ln_post(x[:, 1:]) @ v.proj


def test_losses_match_plain_reference(clip):
    m, b = model(clip, mask_ratio=0.25), batch()
    learner = m.prompt_learner
    out = m(b["image"])
    out = {**out, **m.frozen_outputs(b["image"])}
    terms = learner.losses(out, b, m.backbone)
    s = clip.logit_scale.exp()
    f_p, g_p, y = out["image_features"], out["text_features"], b["label"]
    with torch.no_grad():
        f_o = F.normalize(clip.model.encode_image(b["image"]), dim=-1)
        tok = [clip.tokenizer([t.format(c.replace("_", " ")) for c in CLASSES]) for t in TEMPLATES]
        g_ens = F.normalize(sum(clip.model.encode_text(t) for t in tok) / len(TEMPLATES), dim=-1)
        g_o = F.normalize(clip.model.encode_text(clip.tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])), dim=-1)
        # saliency: cosine of projected patches to g_o(y); mask the floor(0.25 * 16) = 4 least salient
        sal = F.cosine_similarity(manual_patch_tokens(clip, b["image"]), g_o[y][:, None], dim=-1)
        masked = b["image"].clone()
        for i in range(3):
            for p in sal[i].argsort()[:4].tolist():
                r, c = divmod(p, 4)
                masked[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 0
    torch.testing.assert_close(terms["disa_sr_text"], 25 * (g_p - g_ens).abs().mean(), **TOL)
    torch.testing.assert_close(terms["disa_sr_image"], 10 * (f_p - f_o).abs().mean(), **TOL)
    p_o = (s * f_o @ g_ens.t()).softmax(-1)
    p_p = out["logits"].softmax(-1)
    torch.testing.assert_close(terms["disa_sr_logits"], (p_o * (p_o.log() - p_p.log())).sum() / p_p.numel(), **TOL)
    f_masked = F.normalize(clip.encode_image(masked, [learner]), dim=-1)
    p_a = (s * f_masked @ g_o.t()).softmax(-1)
    p_b = (s * f_o @ g_p.t()).softmax(-1)
    torch.testing.assert_close(terms["disa_cir"], (p_a * (p_a.log() - p_b.log())).sum(-1).mean(), atol=1e-5, rtol=1e-4)
    cos = (f_p * learner.prototypes[y]).sum(-1) / (f_p.norm(dim=-1) * learner.prototypes[y].norm(dim=-1))
    torch.testing.assert_close(terms["disa_dir"], (1 - cos).mean(), **TOL)
    # both prompt sets learn through CIR: vision via f_p(x~), text via g_p
    terms["disa_cir"].backward()
    assert learner.vision_ctx.grad.abs().sum() > 0 and learner.ctx.grad.abs().sum() > 0


def test_cir_direction_flag_and_validation(clip):
    m, b = model(clip, mask_ratio=0.0, cir_direction="frozen_image_first"), batch()
    out = {**m(b["image"]), **m.frozen_outputs(b["image"])}
    s = clip.logit_scale.exp()
    p_a = (s * out["image_features"] @ out["frozen_text_features"].t()).softmax(-1)
    p_b = (s * out["frozen_image_features"] @ out["text_features"].t()).softmax(-1)
    got = m.prompt_learner.losses(out, b, m.backbone)["disa_cir"]
    torch.testing.assert_close(got, (p_b * (p_b.log() - p_a.log())).sum(-1).mean(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="mask_ratio"):
        DiSa(mask_ratio=1.0)
    m.eval()
    assert m.prompt_learner.losses(out, b, m.backbone) == {}


def test_fit_builds_prototypes_from_training_shots_and_tests_base_new(tmp_path: Path, clip):
    root = make_dataset(tmp_path / "toy")
    dm = FewShotDataModule(root=str(root), dataset="Toy", num_shots=2, transforms={"image_size": 32}, loader={"batch_size": 4, "eval_batch_size": 8})
    torch.manual_seed(0)
    learner = DiSa(depth_text=2, depth_vision=2, sr_templates=TEMPLATES)
    module = CLIPClassifier(clip, learner)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert {"train/disa_cir", "train/disa_dir", "train/disa_sr_text"} <= set(trainer.callback_metrics)
    # prototypes: base classes only (3 of 5), from the un-augmented training shots, frozen model
    tf = build_test_transform(32)
    items = dm.train_set.items
    from vlm.datamodules.transforms import load_image

    with torch.no_grad():
        feats = F.normalize(clip.model.encode_image(torch.stack([tf(load_image(d.impath)) for d in items])), dim=-1)
    labels = torch.tensor([d.label for d in items])
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    ref = torch.stack([F.normalize(feats[labels == c].mean(0), dim=0) for c in range(3)])
    torch.testing.assert_close(learner.prototypes, ref, **TOL)
    metrics = trainer.test(module, datamodule=dm, verbose=False)
    flat = {k: v for d in metrics for k, v in d.items()}
    assert {"test/acc_base", "test/acc_new", "test/hm"} <= set(flat)
