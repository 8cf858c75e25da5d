"""DAPT (Zhang et al., TPAMI 2025) against plain references of its equations, on tiny towers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from tests.datamodules.toydata import make_dataset
from tests.helpers import short_text_clip
from vlm.backbones import ClipBackbone
from vlm.datamodules.masked import MaskedFewShotDataModule, PairedTrainTransform, read_mask
from vlm.datamodules.transforms import build_train_transform
from vlm.modules import CLIPClassifier
from vlm.prompts.dapt import DAPT
from vlm.prompts.dapt_losses import BACKGROUND_WORDS, DaptSchedule
from vlm.prompts.dapt_masks import cls_attention_masks

CLASSES = ["cat", "sea_lion", "owl"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    return short_text_clip()


def model(clip: ClipBackbone, **kwargs) -> CLIPClassifier:
    torch.manual_seed(1)
    return CLIPClassifier(clip, DAPT(depth=2, **kwargs), classnames=CLASSES).train()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    return {
        "image": torch.randn(3, 3, 32, 32, generator=g),
        "label": torch.tensor([0, 2, 1]),
        "mask": F.interpolate(grid, size=(32, 32), mode="nearest"),
    }


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(logits.log_softmax(-1)[torch.arange(len(target)), target]).mean()


def test_schedule_switches_at_epoch_index_7(clip):
    s = DaptSchedule()
    assert s.weights(6) == {"triplet": 0.8, "fg": 0.0, "bg": 0.0}
    assert s.weights(7) == {"triplet": 0.0, "fg": 0.1, "bg": 0.5}
    m, b = model(clip), batch()
    for epoch, keys in ((0, {"dapt_triplet"}), (6, {"dapt_triplet"}), (7, {"dapt_fg", "dapt_bg"}), (9, {"dapt_fg", "dapt_bg"})):
        m.prompt_learner.on_train_epoch_start(epoch)
        assert set(m.prompt_learner.losses(m(b["image"]), b, m.backbone)) == keys
    m.eval()
    assert m.prompt_learner.losses(m(b["image"]), b, m.backbone) == {}


def test_losses_match_plain_reference(clip):
    m, b = model(clip), batch()
    learner = m.prompt_learner
    tau = clip.logit_scale.exp()
    fg_view, bg_view = b["image"] * b["mask"], b["image"] * (1 - b["mask"])
    with torch.no_grad():
        z_f = F.normalize(clip.encode_image(fg_view, [learner]), dim=-1)
        z_b = F.normalize(clip.encode_image(bg_view, [learner]), dim=-1)
        bg_tokens = clip.tokenizer([f"a clean origami {w}." for w in BACKGROUND_WORDS])
        t_bg = F.normalize(clip.encode_text(bg_tokens, [learner]), dim=-1)
    out = m(b["image"])
    learner.on_train_epoch_start(0)
    terms = learner.losses(out, b, m.backbone)
    d_pos = (out["image_features"] - z_f).norm(dim=-1)
    d_neg = (out["image_features"] - z_b).norm(dim=-1)
    ref_triplet = 0.8 * (d_pos - d_neg + 1.5).clamp(min=0).mean()
    torch.testing.assert_close(terms["dapt_triplet"], ref_triplet, atol=1e-5, rtol=1e-4)
    learner.on_train_epoch_start(7)
    terms = learner.losses(out, b, m.backbone)
    ref_fg = 0.1 * ce(tau * z_f @ out["text_features"].t(), b["label"])
    bg_logits = tau * z_b @ t_bg.t()
    ref_bg = 0.5 * ce(bg_logits, bg_logits.argmax(-1))
    torch.testing.assert_close(terms["dapt_fg"], ref_fg, **TOL)
    torch.testing.assert_close(terms["dapt_bg"], ref_bg, **TOL)


def test_gradient_paths(clip):
    """L_f trains the text side only (z_f detached); L_v reaches the prompts through the anchor only."""
    m, b = model(clip), batch()
    learner = m.prompt_learner
    learner.on_train_epoch_start(7)
    learner.losses(m(b["image"]), b, m.backbone)["dapt_fg"].backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert learner.proj.weight.grad is None  # the vision coupling gets nothing from L_f
    learner.zero_grad(set_to_none=True)
    learner.losses(m(b["image"]), b, m.backbone)["dapt_bg"].backward()
    assert learner.proj.weight.grad is not None and learner.proj.weight.grad.abs().sum() > 0


def test_bg_slicing_parity_flag(clip):
    default, official = model(clip), model(clip, bg_slicing="official", eval_extra_bg_columns=32)
    b = batch()
    assert default.prompt_learner.loss_background_words() == list(BACKGROUND_WORDS)
    assert official.prompt_learner.loss_background_words() == list(BACKGROUND_WORDS[7:])
    assert default(b["image"])["logits"].shape == (3, 3)
    train_logits = official(b["image"])["logits"]
    assert train_logits.shape == (3, 3 + 7)  # the official [:-25] slice keeps ground..sky as classes
    torch.testing.assert_close(train_logits[:, :3], default(b["image"])["logits"], **TOL)
    official.eval()
    logits = official(b["image"])["logits"]
    assert logits.shape == (3, 3 + 32)  # forward_test scores every background row
    # test accuracy counts a background prediction as an error
    official.test_classnames = {"base": CLASSES}
    official._sync_test_metrics()
    labels = logits[:, :3].argmax(-1)
    official.test_acc["base"].update(logits.argmax(-1), labels)
    expected = (logits.argmax(-1) == labels).float().mean()
    assert float(official.test_acc["base"].compute()) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="eval_extra_bg_columns"):
        DAPT(eval_extra_bg_columns=33)


def official_dapt(clip, learner, b: dict[str, torch.Tensor], epoch: int, training: bool = True):
    """A transcription of the official ``CustomCLIP.forward`` / ``forward_test`` (Ferenas/DAPT @ e556f17,
    ``trainers/maple.py``): one text pass over the class rows followed by all 32 background rows,
    then ``text_features[:-25]`` as the class columns and ``text_features[-25:]`` as ``T_bg``."""
    from vlm.prompts.maple import MaPLe

    cls_in = MaPLe.text_inputs(learner, CLASSES, "{}")
    bg_tokens = clip.tokenizer([f"a clean origami {w}." for w in BACKGROUND_WORDS])
    with torch.no_grad():
        bg_embeds = clip.text.token_embedding(bg_tokens)
    tokens = torch.cat([cls_in.tokens, bg_tokens])
    text_features = clip.encode_text(tokens, [learner], torch.cat([cls_in.embeds, bg_embeds]))
    tau = clip.logit_scale.exp()
    z = F.normalize(clip.encode_image(b["image"], [learner]), dim=-1)
    if not training:  # forward (base evaluation) scores text_features[:-25]; forward_test all rows
        return tau * z @ F.normalize(text_features[:-25], dim=-1).t(), tau * z @ F.normalize(text_features, dim=-1).t()
    t_fg = F.normalize(text_features[:-25], dim=-1)
    logits = tau * z @ t_fg.t()
    t_bg = F.normalize(text_features[-25:], dim=-1)
    z_f = F.normalize(clip.encode_image(b["image"] * b["mask"], [learner]), dim=-1)
    z_b = F.normalize(clip.encode_image(b["image"] * (1 - b["mask"]), [learner]), dim=-1)
    loss_re1 = F.triplet_margin_loss(z, z_f.detach(), z_b.detach(), margin=1.5)
    foreground_score = tau * z_f.detach() @ t_fg.t()
    pseudo_label = torch.argmax(z_b @ t_bg.t(), dim=-1)
    loss_bg = F.cross_entropy(tau * z_b @ t_bg.t(), pseudo_label)
    loss_fg = F.cross_entropy(foreground_score, b["label"])
    loss_re = 0.1 * loss_fg + 0.5 * loss_bg if epoch > 6 else 0.8 * loss_re1
    return logits, F.cross_entropy(logits, b["label"]) + loss_re


@pytest.mark.parametrize("epoch", [0, 7])
def test_official_slicing_reproduces_the_official_loss(clip, epoch):
    """``bg_slicing="official"``: the logits and the whole training loss of the official code."""
    m, b = model(clip, bg_slicing="official"), batch()
    learner = m.prompt_learner
    learner.on_train_epoch_start(epoch)
    out = m(b["image"])
    ours = F.cross_entropy(out["logits"], b["label"]) + sum(learner.losses(out, b, m.backbone).values())
    ref_logits, ref_loss = official_dapt(clip, learner, b, epoch)
    torch.testing.assert_close(out["logits"], ref_logits, **TOL)
    torch.testing.assert_close(ours, ref_loss, **TOL)
    default = model(clip)
    default.prompt_learner.on_train_epoch_start(epoch)
    out_d = default(b["image"])
    loss_d = F.cross_entropy(out_d["logits"], b["label"]) + sum(default.prompt_learner.losses(out_d, b, default.backbone).values())
    assert not torch.allclose(loss_d, ref_loss, **TOL)  # the corrected slicing is a different objective


def test_eval_extra_bg_columns_reproduce_the_official_evaluation(clip):
    """7 extra columns = the official base evaluation (``forward``), 32 = ``forward_test`` (novel)."""
    b = batch()
    for extra, which in ((7, 0), (32, 1)):
        m = model(clip, eval_extra_bg_columns=extra).eval()
        with torch.no_grad():
            ref = official_dapt(clip, m.prompt_learner, b, epoch=0, training=False)[which]
            torch.testing.assert_close(m(b["image"])["logits"], ref, **TOL)


def square_image(size: int = 40) -> tuple[Image.Image, Image.Image]:
    arr = np.zeros((size, size + 8, 3), dtype=np.uint8)
    mask = np.zeros((size, size + 8), dtype=np.uint8)
    arr[8:24, 20:40] = 255
    mask[8:24, 20:40] = 1
    return Image.fromarray(arr), Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("seed", range(6))
def test_pair_transform_keeps_image_and_mask_aligned(seed):
    image, mask = square_image()
    names = ("random_resized_crop", "random_flip")
    tf = PairedTrainTransform(24, names, crop_scale=(0.3, 1.0))
    torch.manual_seed(seed)
    img_t, mask_t = tf(image, read_mask_from(mask))
    torch.manual_seed(seed)
    same = build_train_transform(24, names, crop_scale=(0.3, 1.0))(image)
    torch.testing.assert_close(img_t, same, atol=0, rtol=0)  # the image sees exactly the plain pipeline
    bright = img_t.mean(0) > 0.5
    inside = mask_t[0] > 0.5
    assert set(mask_t.unique().tolist()) <= {0.0, 1.0}
    # up to interpolation at the square's border, mask and bright square coincide
    disagree = (bright != inside).float()
    border = F.max_pool2d(inside[None, None].float(), 3, 1, 1)[0, 0] - (-F.max_pool2d(-inside[None, None].float(), 3, 1, 1))[0, 0]
    assert float((disagree * (1 - border)).sum()) == 0


def read_mask_from(mask: Image.Image) -> Image.Image:
    return Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")


def test_read_mask_format(tmp_path: Path):
    arr = np.array([[0, 1, 7], [254, 255, 0]], dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "m.png")
    got = np.asarray(read_mask(tmp_path / "m.png")) > 0
    assert got.tolist() == [[False, True, True], [True, False, False]]  # 255 = void = background
    got = np.asarray(read_mask(tmp_path / "m.png", void_value=None)) > 0
    assert got[1, 1]
    with pytest.raises(FileNotFoundError, match="Mask"):
        read_mask(tmp_path / "absent.png")


def test_cls_attention_masks_match_plain_attention(clip):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    v = clip.model.visual
    with torch.no_grad():
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(2, 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        for blk in v.transformer.resblocks[:-1]:
            x = blk(x)
        last = v.transformer.resblocks[-1]
        q, k, _ = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1)
        h = last.attn.num_heads
        q = q.view(2, -1, h, 64 // h).transpose(1, 2)
        k = k.view(2, -1, h, 64 // h).transpose(1, 2)
        attn = (q @ k.transpose(-1, -2) / (64 // h) ** 0.5).softmax(-1)
        cls_row = attn[:, :, 0, 1:].mean(1)
    for norm in ("image", "batch"):
        peak = cls_row.amax(1, keepdim=True) if norm == "image" else cls_row.amax()
        grid = (cls_row / peak >= 0.5).float().view(2, 1, 4, 4)
        ref = grid.repeat_interleave(8, 2).repeat_interleave(8, 3)
        assert torch.equal(cls_attention_masks(clip, images, 0.5, norm), ref)


def write_masks(root: Path) -> Path:
    """A mask per toy image: the left half of the image is foreground."""
    mask_root = root / "masks"
    for img in (root / "images").rglob("*.png"):
        w, h = Image.open(img).size
        arr = np.zeros((h, w), dtype=np.uint8)
        arr[:, : w // 2] = 1
        out = mask_root / img.relative_to(root / "images")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode="L").save(out)
    return mask_root


@pytest.mark.parametrize("source", ["dataset", "cls_attention"])
def test_fit_and_base_new_test(tmp_path: Path, clip, source):
    root = make_dataset(tmp_path / "toy")
    kw = dict(root=str(root), dataset="Toy", num_shots=2, transforms={"image_size": 32}, loader={"batch_size": 4, "eval_batch_size": 8})
    if source == "dataset":
        dm = MaskedFewShotDataModule(mask_root=str(write_masks(root)), **kw)
        dm.setup("fit")
        b = next(iter(dm.train_dataloader()))
        assert set(b) == {"image", "label", "index", "mask"} and b["mask"].shape == (4, 1, 32, 32)
    else:
        from vlm.datamodules import FewShotDataModule

        dm = FewShotDataModule(**kw)
    torch.manual_seed(0)
    module = CLIPClassifier(clip, DAPT(depth=2, mask_source=source, switch_epoch=1))
    before = {n: p.detach().clone() for n, p in module.prompt_learner.named_parameters()}
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert "train/dapt_bg" in trainer.callback_metrics  # epoch 1 ran the fg/bg phase
    changed = [n for n, p in module.prompt_learner.named_parameters() if not torch.equal(p, before[n])]
    assert "ctx" in changed and "proj.weight" in changed
    metrics = trainer.test(module, datamodule=dm, verbose=False)
    flat = {k: v for d in metrics for k, v in d.items()}
    assert {"test/acc_base", "test/acc_new", "test/hm"} <= set(flat)
    assert all(0.0 <= flat[k] <= 100.0 for k in ("test/acc_base", "test/acc_new"))


def test_dataset_mode_needs_masks(clip):
    m, b = model(clip), batch()
    del b["mask"]
    with pytest.raises(KeyError, match="mask"):
        m.prompt_learner.losses(m(b["image"]), b, m.backbone)
