"""VisionZip against an independent plain port of the released algorithm (dvlab-research/VisionZip,
``CLIPVisionTower_VisionZip.forward``), one image at a time, on explicit attention matrices and
keys computed from the layers' own projections; ours runs batched through the CLS probe row."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.llava.tiny import TINY_LLAVA_CONFIG
from tests.pruning.test_formulas import PATCHES, check_batch_invariance, formula_setup
from vlm import pruning
from vlm.backbones import ClipBackbone, ViTBackbone
from vlm.tokens import TokenType

TOL = dict(atol=1e-5, rtol=1e-5)


def zip_one(y: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, prefix: int, dominant: int, contextual: int, merge: str):
    """The released selection and merge for one image, literally: ``y [N, D]`` the layer's output,
    ``attn [H, N, N]`` its attention, ``keys [H, N, d]`` its raw keys; the first ``prefix`` tokens
    are CLS (and registers), kept. Returns (kept sequence indices, their vectors) in emission order:
    prefix, dominant in raster order, contextual in anchor order."""
    n = y.shape[0]
    patches = list(range(prefix, n))
    score = {j: float(attn[:, 0, j].sum()) for j in patches}  # CLS row summed over heads
    dom = sorted(sorted(patches, key=lambda j: (-score[j], j))[:dominant])
    rest = [j for j in patches if j not in dom]
    out_idx = list(range(prefix)) + dom
    out = [y[j] for j in out_idx]
    c = min(contextual, len(rest))
    if c:
        metric = keys.mean(0)  # head mean of the raw keys
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // c)
        targets = list(range(0, len(rest), step))[:c]
        groups = {t: [] for t in targets}
        for r, j in enumerate(rest):
            if r in groups:
                continue
            sims = [float(metric[j] @ metric[rest[t]]) for t in targets]
            groups[targets[sims.index(max(sims))]].append(j)
        for t in targets:
            members = groups[t]
            anchor = y[rest[t]]
            if merge == "released":
                v = anchor + (torch.stack([y[i] for i in members]).mean(0) if members else 0)
            else:
                v = (anchor + sum(y[i] for i in members)) / (1 + len(members))
            out_idx.append(rest[t])
            out.append(v)
    return out_idx, torch.stack(out)


def plain_hf_clip(vm, pixel, n_blocks, cut_layer, dominant, contextual, merge="released"):
    """One image through ``n_blocks`` transformers CLIP layers (their own forward); after
    ``cut_layer`` the released zip on that layer's explicit attention and keys."""
    h = vm.pre_layrnorm(vm.embeddings(pixel[None]))[0]
    ids = list(range(h.shape[0]))
    for i in range(n_blocks):
        layer = vm.encoder.layers[i]
        at = layer.self_attn
        n, heads, d = h.shape[0], at.num_heads, at.head_dim
        xn = layer.layer_norm1(h)
        q = at.q_proj(xn).view(n, heads, d).transpose(0, 1)
        k = at.k_proj(xn).view(n, heads, d).transpose(0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) * at.scale, dim=-1)
        h = layer(h[None], None)[0]
        if i == cut_layer:
            keep, h = zip_one(h, attn, k, 1, dominant, contextual, merge)
            ids = [ids[j] for j in keep]
    return ids, h


def plain_timm(model, image, cut_layer, dominant, contextual, merge="released"):
    """One image through a timm ViT's blocks (their own forward) and final norm, the zip after
    ``cut_layer``."""
    m = model
    h = m.norm_pre(m._pos_embed(m.patch_embed(image[None])))[0]
    ids = list(range(h.shape[0]))
    for i, blk in enumerate(m.blocks):
        at = blk.attn
        n, heads = h.shape[0], at.num_heads
        qkv = at.qkv(blk.norm1(h)).view(n, 3, heads, -1).permute(1, 2, 0, 3)
        q, k = at.q_norm(qkv[0]), at.k_norm(qkv[1])
        attn = torch.softmax(q @ k.transpose(1, 2) * at.scale, dim=-1)
        h = blk(h[None])[0]
        if i == cut_layer:
            keep, h = zip_one(h, attn, k, m.num_prefix_tokens, dominant, contextual, merge)
            ids = [ids[j] for j in keep]
    return ids, m.norm(h)


@pytest.fixture(scope="module")
def setup():
    return formula_setup()  # tiny LLaVA: 36 patches, 7 blocks to the feature layer, 3 images


LLAVA_CASES = [
    (dict(num_tokens=10), 8, 2, "released"),  # the released 10/64 ratio: 8 + 2
    (dict(num_tokens=12, contextual=5, merge="mean"), 7, 5, "mean"),
    (dict(num_tokens=9, contextual=3, cls_in_budget=True), 5, 3, "released"),  # CLS takes a dominant slot
    (dict(num_tokens=20, contextual=7), 13, 7, "released"),  # 23 left, step 3
]


@pytest.mark.parametrize("kwargs,dominant,contextual,merge", LLAVA_CASES)
@torch.no_grad()
def test_llava_tower_equals_plain_released_algorithm(setup, kwargs, dominant, contextual, merge):
    runner, pixels = setup
    pruner = pruning.create("visionzip", **kwargs)
    assert (pruner.dominant, pruner.contextual) == (dominant, contextual)
    state = runner.vision.hidden_state(pixels, runner.feature_layer, [pruner])
    n_blocks = runner.vision.blocks_for(runner.feature_layer)
    assert state.lengths is None and state.x.shape[1] == 1 + dominant + contextual
    for i in range(pixels.shape[0]):
        ids, h = plain_hf_clip(runner.vision.model, pixels[i], n_blocks, n_blocks - 1, dominant, contextual, merge)
        assert state.positions[i].tolist() == ids
        torch.testing.assert_close(state.x[i], h, **TOL)
    # what reaches the LLM: CLS dropped, the budget exactly, dominant then contextual
    visual = runner.encode_images(pixels, [pruning.create("visionzip", **kwargs)])
    assert visual.counts.tolist() == [dominant + contextual] * 3 == [pruner.num_tokens - pruner.cls_in_budget] * 3
    assert visual.positions.tolist() == (state.positions[:, 1:] - 1).tolist()


@torch.no_grad()
def test_released_defaults_and_flags(setup):
    for budget, split in ((64, (54, 10)), (128, (108, 20)), (192, (162, 30))):
        p = pruning.create("visionzip", num_tokens=budget)
        assert (p.dominant, p.contextual) == split
    assert pruning.create("visionzip", num_tokens=64, cls_in_budget=True).dominant == 53  # visionzip(dominant=54)
    with pytest.raises(ValueError, match="contextual"):
        pruning.create("visionzip", num_tokens=4, contextual=5)
    with pytest.raises(ValueError, match="merge"):
        pruning.create("visionzip", merge="sum")
    runner, pixels = setup
    kw = dict(num_tokens=10, contextual=4)
    released = runner.encode_images(pixels, [pruning.create("visionzip", **kw)])
    raster = runner.encode_images(pixels, [pruning.create("visionzip", raster_order=True, **kw)])
    for i in range(3):
        pos, n = released.positions[i], int(released.counts[i])
        assert bool((pos[1:6] > pos[:5]).all()) and bool((pos[7:n] > pos[6 : n - 1]).all())  # two raster runs
        order = pos[:n].argsort()
        assert raster.positions[i, :n].tolist() == pos[:n][order].tolist()
        torch.testing.assert_close(raster.features[i, :n], released.features[i, :n][order], **TOL)


@torch.no_grad()
def test_budget_exact_batch_invariant_and_all_patches(setup):
    runner, pixels = setup
    for budget in (1, 10, 35):
        visual = runner.encode_images(pixels, [pruning.create("visionzip", num_tokens=budget)])
        assert visual.counts.tolist() == [budget] * 3
        for i in range(3):
            pos = visual.positions[i, :budget]
            assert len(set(pos.tolist())) == budget and bool((pos >= 0).all()) and bool((pos < PATCHES).all())
    check_batch_invariance(runner, pixels, "visionzip", dict(num_tokens=10))
    # every patch: nothing is merged, the features are the unpruned ones (reordered)
    full = runner.encode_images(pixels)
    every = runner.encode_images(pixels, [pruning.create("visionzip", num_tokens=PATCHES, raster_order=True)])
    torch.testing.assert_close(every.features, full.features, **TOL)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViTBackbone("test_vit", model_kwargs={"img_size": 64, "patch_size": 8, "global_pool": "avg"})


@pytest.mark.parametrize("kwargs,cut,dominant,contextual", [(dict(num_tokens=12, contextual=4), -1, 8, 4), (dict(num_tokens=20, layer=1), 1, 17, 3)])
@torch.no_grad()
def test_timm_classifier_equals_plain_released_algorithm(vit, kwargs, cut, dominant, contextual):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    state = vit.vision.forward_features(images, [pruning.create("visionzip", **kwargs)])
    cut = cut % len(vit.model.blocks)
    for i in range(3):
        ids, h = plain_timm(vit.model, images[i], cut, dominant, contextual)
        assert state.positions[i].tolist() == ids
        torch.testing.assert_close(state.x[i], h, **TOL)
    logits = vit.vision(images, [pruning.create("visionzip", **kwargs)]).pooled
    for i in range(3):
        torch.testing.assert_close(vit.vision(images[i : i + 1], [pruning.create("visionzip", **kwargs)]).pooled[0], logits[i], **TOL)


@torch.no_grad()
def test_open_clip_classifier_keeps_cls_prompts_and_budget():
    from tests.helpers import tiny_clip_cfg
    from vlm import prompts
    from vlm.modules.clip_classifier import CLIPClassifier

    torch.manual_seed(0)
    bb = ClipBackbone("tiny", model_cfg=tiny_clip_cfg(image_size=48, layers=3))
    module = CLIPClassifier(bb, prompt_learner=prompts.create("vpt", num_tokens=2), classnames=["cat", "dog"],
                            pruner=pruning.create("visionzip", num_tokens=7, layer=1)).eval()
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    types = bb.vision(images, module.hooks).state.batch_types
    assert (types == int(TokenType.CLS)).sum(1).tolist() == [1] * 3
    assert (types == int(TokenType.PROMPT)).sum(1).tolist() == [2] * 3
    assert (types == int(TokenType.PATCH)).sum(1).tolist() == [7] * 3
    logits = module(images)["logits"]
    for i in range(3):
        torch.testing.assert_close(module(images[i : i + 1])["logits"][0], logits[i], **TOL)


def test_towers_without_cls_are_refused():
    from vlm.context import Tower, TowerContext
    from vlm.kernels import AttnSpec
    from vlm.tokens import TokenState

    state = TokenState.create(torch.randn(1, 8, 4), torch.full((8,), int(TokenType.PATCH)))
    ctx = TowerContext(Tower.VISION, 2, token_group=4).at(1, None)
    with pytest.raises(TypeError, match="no CLS token.*mean query"):
        pruning.create("visionzip", num_tokens=2).attention_spec(ctx, state, AttnSpec())


def test_llava_eval_generates_with_visionzip(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from tests.llava.tiny import save_tiny_processor
    from vlm.backbones import LlavaBackbone
    from vlm.datamodules.vqa import VQADataModule
    from vlm.modules.llava_eval import LlavaEval

    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        lines.append({"question_id": i, "image": f"{i}.png", "text": f"w{i} w{i + 1}", "label": "yes" if i % 2 else "no", "category": "random"})
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    save_tiny_processor(tmp_path / "processor")
    torch.manual_seed(0)
    backbone = LlavaBackbone(config=TINY_LLAVA_CONFIG, processor=str(tmp_path / "processor"))
    module = LlavaEval(backbone, pruner=pruning.create("visionzip", num_tokens=6), max_new_tokens=3, prompt_template="<image> {question}")
    dm = VQADataModule(str(tmp_path / "q.jsonl"), str(tmp_path), metric="pope", dataset="pope", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.test(module, datamodule=dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["test/visual_tokens"] == 6
    assert 0.0 <= m["test/pope_acc"] <= 100.0


@torch.no_grad()
def test_llava_next_crops_keep_the_budget_and_are_batch_invariant():
    from tests.llava.test_llava_next import SIZES, prompts as next_prompts, tiny_llava_next
    from tests.llava.tiny import pad_batch
    from vlm.towers.llava_next import LlavaNextRunner

    runner = LlavaNextRunner(tiny_llava_next())
    pixels = torch.randn(3, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    hooks = [pruning.create("visionzip", num_tokens=6, contextual=2)]
    visual = runner.encode_images(pixels, hooks, image_sizes=SIZES)
    assert visual.crops.counts.tolist() == [6] * 11
    state = runner.vision.hidden_state(pixels[0, :3], runner.feature_layer, hooks)  # image 0: base + 1x2 grid
    for c in range(3):
        ids, h = plain_hf_clip(runner.vision.model, pixels[0, c], 3, 2, 4, 2)
        assert state.positions[c].tolist() == ids
        torch.testing.assert_close(state.x[c], h, **TOL)
    seqs = next_prompts(visual.counts)
    ids, mask = pad_batch(seqs, "left")
    together = runner.generate(ids, pixels, mask, hooks, max_new_tokens=3, image_sizes=SIZES)
    for i, seq in enumerate(seqs):
        one_ids, one_mask = pad_batch([seq], "left")
        n = int(visual.crops_per_image[i])
        one = runner.generate(one_ids, pixels[i : i + 1, :n], one_mask, hooks, max_new_tokens=3, image_sizes=SIZES[i : i + 1])
        assert torch.equal(together.tokens[i], one.tokens[0])
