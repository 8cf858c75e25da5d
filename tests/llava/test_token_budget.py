"""Token budgets on LLaVA are checked when ``LlavaEval`` is built (issue 24, item 2).

Before, a pruner whose budget was above what the backbone gives it kept every token, the run
exited 0 and its result carried the pruner's name. Now ``LlavaEval`` calls ``Backbone.check_budget``,
the same check the CLIP/ViT classifiers run (``vlm.runtime.reliability.check_token_budget``):

* a vision pruner's ``num_tokens`` against the patches of one vision-tower image (LLaVA-1.5) or one
  crop (LLaVA-NeXT anyres: the base view and each sub-crop are pruned separately);
* an LLM-stage pruner (``flowcut_llm``): its vision stage by the same rule, and its LLM budget
  against the most visual tokens that can reach its cut (crops per image x what each crop keeps).

A budget equal to what is available keeps every token and is allowed. The tiny random models
(32 px images of 8 px patches: 16 patches per image or crop; LLaVA-NeXT grids up to 2x2, so 5
crops per image) are built here, offline; two 336 px / 14 px ones check LLaVA's real counts.
"""

from __future__ import annotations

import pytest

from tests.llava.test_llava_next import next_config
from tests.llava.tiny import TINY_LLAVA_CONFIG
from vlm import pruning
from vlm.backbones import Backbone, LlavaBackbone, LlavaNextBackbone
from vlm.modules.llava_eval import LlavaEval
from vlm.runtime.reliability import TokenBudgetError, check_token_budget

PATCHES = 16  # (32 px // 8 px) ** 2, per image (LLaVA-1.5) or per crop (LLaVA-NeXT)
CROPS = 5  # LLaVA-NeXT: the base view + the largest grid of next_config's pinpoints (2x2)
VISION_PRUNERS = [n for n in pruning.available() if "vision" in pruning.PRUNERS.get(n).towers]


@pytest.fixture(scope="module")
def llava() -> LlavaBackbone:
    return LlavaBackbone(config=TINY_LLAVA_CONFIG)


@pytest.fixture(scope="module")
def llava_next() -> LlavaNextBackbone:
    return LlavaNextBackbone(config=next_config())


def build(backbone: LlavaBackbone, name: str, **kwargs) -> LlavaEval:
    return LlavaEval(backbone, pruning.create(name, **kwargs), max_new_tokens=1)


def test_backbones_declare_their_patch_counts(llava: LlavaBackbone, llava_next: LlavaNextBackbone) -> None:
    assert (llava.patches_per_image, llava.patch_unit, llava.views_per_image) == (PATCHES, "image", 1)
    assert (llava_next.patches_per_image, llava_next.patch_unit, llava_next.views_per_image) == (PATCHES, "crop", CROPS)


@pytest.mark.parametrize("name", VISION_PRUNERS)
@pytest.mark.parametrize("kind,unit", [("llava", "image"), ("llava_next", "crop")])
def test_vision_budget_above_the_patches_is_refused_at_construction(request, kind: str, unit: str, name: str) -> None:
    backbone = request.getfixturevalue(kind)
    with pytest.raises(TokenBudgetError) as err:
        build(backbone, name, num_tokens=PATCHES + 1)
    message = str(err.value)
    assert f"Pruner {name!r} keeps num_tokens={PATCHES + 1} patch tokens" in message
    assert f"produces only {PATCHES} per {unit} ({type(backbone).__name__}" in message
    assert f"Set pruner num_tokens <= {PATCHES}" in message
    module = build(backbone, name, num_tokens=PATCHES)  # every patch: allowed, as on CLIP
    assert module.method_name == name


@pytest.mark.parametrize(
    "kind,kwargs,error",
    [
        # the vision stage (crop_tokens, num_tokens // 2 by default) against the patches per image/crop
        pytest.param("llava", dict(num_tokens=8, crop_tokens=PATCHES + 1), r"vision stage \('flowcut'\) that keeps num_tokens=17 patch tokens per image, but the backbone produces only 16 per image.*Set crop_tokens <= 16", id="llava-crop_tokens>patches"),
        pytest.param("llava_next", dict(num_tokens=2 * PATCHES + 2), r"vision stage \('flowcut'\) that keeps num_tokens=17 patch tokens per crop.*only 16 per crop.*Set crop_tokens <= 16, or run the LLM stage alone \(two_stage=False\)", id="next-default_crop_tokens>patches"),
        # the LLM budget against what reaches the cut: LLaVA-1.5's one image keeps crop_tokens = T // 2 < T
        pytest.param("llava", dict(num_tokens=8), r"num_tokens=8 visual tokens per sample after LLM layer 1, but at most 4 reach it \(4 patch tokens per image, kept by its vision stage 'flowcut'.*Set pruner num_tokens <= 4, raise crop_tokens to >= 8, or run the LLM stage alone", id="llava-default_recipe_noop_cut"),
        pytest.param("llava", dict(num_tokens=PATCHES + 1, two_stage=False), r"at most 16 reach it \(16 patch tokens per image, every patch.*Set pruner num_tokens <= 16\.$", id="llava-llm_only>patches"),
        pytest.param("llava_next", dict(num_tokens=CROPS * PATCHES + 1, crop_tokens=PATCHES), r"num_tokens=81 .*at most 80 reach it \(5 crops per image x 16 patch tokens, kept by its vision stage 'flowcut'", id="next-two_stage>crops*crop_tokens"),
        pytest.param("llava_next", dict(num_tokens=CROPS * PATCHES + 1, two_stage=False), r"at most 80 reach it \(5 crops per image x 16 patch tokens, every patch", id="next-llm_only>crops*patches"),
        # equal budgets, and the released anyres recipe's shape (T // 2 per crop, T after the LLM layer)
        pytest.param("llava", dict(num_tokens=8, crop_tokens=8), None, id="llava-equal_two_stage"),
        pytest.param("llava", dict(num_tokens=PATCHES, two_stage=False), None, id="llava-equal_llm_only"),
        pytest.param("llava_next", dict(num_tokens=CROPS * PATCHES, crop_tokens=PATCHES), None, id="next-equal_two_stage"),
        pytest.param("llava_next", dict(num_tokens=CROPS * PATCHES, two_stage=False), None, id="next-equal_llm_only"),
        pytest.param("llava_next", dict(num_tokens=2 * PATCHES), None, id="next-recipe_shape"),
    ],
)
def test_llm_stage_budgets(request, kind: str, kwargs: dict, error) -> None:
    backbone = request.getfixturevalue(kind)
    if error is None:
        assert build(backbone, "flowcut_llm", **kwargs).method_name == "flowcut_llm"
        return
    with pytest.raises(TokenBudgetError, match=error) as err:
        build(backbone, "flowcut_llm", **kwargs)
    assert "Pruner 'flowcut_llm'" in str(err.value) and type(backbone).__name__ in str(err.value)


def test_llava_counts_at_336_px_with_14_px_patches() -> None:
    """LLaVA-1.5/NeXT-7B's vision geometry on a tiny tower: 576 patches per image or crop, and
    LLaVA-NeXT's default grid pinpoints (up to 2x2 crops of 336 px) give 5 crops per image."""
    vision = dict(TINY_LLAVA_CONFIG["vision_config"], image_size=336, patch_size=14, num_hidden_layers=2)
    v15 = LlavaBackbone(config=dict(TINY_LLAVA_CONFIG, vision_config=vision, image_seq_length=576))
    next_cfg = next_config(image_size=336, patch_size=14, vision_layers=2, text_layers=1)
    next_cfg.pop("image_grid_pinpoints")  # transformers' default, LLaVA-NeXT-7B's
    v16 = LlavaNextBackbone(config=next_cfg)
    assert (v15.patches_per_image, v15.views_per_image) == (576, 1)
    assert (v16.patches_per_image, v16.views_per_image) == (576, 5)
    with pytest.raises(TokenBudgetError, match=r"num_tokens=577 .*only 576 per image \(LlavaBackbone: a 24x24 patch grid of 336 px / 14 px"):
        build(v15, "flowcut", num_tokens=577)
    build(v15, "flowcut", num_tokens=576)
    with pytest.raises(TokenBudgetError, match=r"at most 160 reach it"):  # the anyres recipe on LLaVA-1.5: a no-op LLM cut
        build(v15, "flowcut_llm", num_tokens=320)
    for budget in (160, 320, 640):  # the paper's LLaVA-NeXT budgets
        build(v16, "flowcut_llm", num_tokens=budget)
    with pytest.raises(TokenBudgetError, match=r"keeps num_tokens=640 patch tokens per crop, but the backbone produces only 576 per crop"):
        build(v16, "flowcut_llm", num_tokens=1280)


def test_a_backbone_only_declares_its_counts() -> None:
    """A new backbone (e.g. a dynamic-resolution one, per image) gets the same check by declaring
    ``patches_per_image``; the rule lives in ``check_token_budget`` alone."""

    class PerImage(Backbone):
        patches_per_image = 64

    backbone = PerImage()
    backbone.check_budget(pruning.create("cls_attention", num_tokens=64))
    with pytest.raises(TokenBudgetError, match=r"produces only 64 per image \(PerImage\)"):
        backbone.check_budget(pruning.create("cls_attention", num_tokens=65))
    check_token_budget(pruning.create("cls_attention", num_tokens=10**6), None)  # unknown count: not checked
    check_token_budget(None, 4)
