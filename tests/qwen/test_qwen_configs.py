"""Every Qwen config composes through the CLI parser (nothing is built): the four model configs with
every shipped vision-pruner fragment and the papers' budgets as an override, with every data config,
and with every registered vision pruner by its short name; the tiny random-model fragments compose
after their model config, and their random model runs (the README's way to try the evaluation
without weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.llava.test_configs import BUDGET, DATA
from vlm import pruning
from vlm.context import Tower
from vlm.pruning.registry import PRUNERS
from vlm.registry import import_path
from vlm.runtime.cli import parse_configs

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "configs" / "qwen"
#: config -> (backbone class, hub id, pixels per merged token)
MODELS = {
    "qwen2_5_vl_3b": ("Qwen2_5VLBackbone", "Qwen/Qwen2.5-VL-3B-Instruct", 28 * 28),
    "qwen2_5_vl_7b": ("Qwen2_5VLBackbone", "Qwen/Qwen2.5-VL-7B-Instruct", 28 * 28),
    "qwen3_vl_2b": ("Qwen3VLBackbone", "Qwen/Qwen3-VL-2B-Instruct", 32 * 32),
    "qwen3_vl_8b": ("Qwen3VLBackbone", "Qwen/Qwen3-VL-8B-Instruct", 32 * 32),
}
RANDOM = {"qwen2_5_vl": "qwen2_5_vl_3b", "qwen3_vl": "qwen3_vl_2b"}
VISION = [n for n in pruning.available() if Tower.VISION in PRUNERS.get(n).towers]
#: the shipped fragments of vision pruners (configs/llava/pruner/, shared with LLaVA)
FRAGMENTS = sorted(p for p in (REPO / "configs/llava/pruner").glob("*.yaml") if p.stem in VISION)
PAPER_BUDGETS = (256, 128, 64)


def test_every_qwen_config_is_covered():
    assert {p.stem for p in ROOT.glob("*.yaml")} == set(MODELS)
    assert {p.stem for p in (ROOT / "random").glob("*.yaml")} == set(RANDOM)
    assert FRAGMENTS and {"flowcut", "vtc_cls", "cls_attention"} <= {p.stem for p in FRAGMENTS}


@pytest.mark.parametrize("budget", PAPER_BUDGETS)
@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_configs_compose_with_each_pruner_and_budget(name, fragment, budget):
    cfg = parse_configs([ROOT / f"{name}.yaml", fragment, DATA[0]], [BUDGET, str(budget)])
    init = cfg.model.init_args
    cls, hub, unit = MODELS[name]
    assert init.backbone.class_path == f"vlm.backbones.{cls}" and init.backbone.init_args.model == hub
    assert init.backbone.init_args.max_pixels == 1280 * unit  # 1280 merged tokens per image at most
    assert init.backbone.init_args.position_policy == "original"
    assert init.pruner.class_path == import_path(PRUNERS.get(fragment.stem))
    assert init.pruner.init_args.num_tokens == budget
    assert cfg.model.class_path == "vlm.modules.llava_eval.LlavaEval" and init.prompt_template is None


@pytest.mark.parametrize("data", DATA, ids=lambda p: p.stem)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_configs_compose_with_each_data_config(name, data):
    cfg = parse_configs([ROOT / f"{name}.yaml", data])
    assert cfg.data.init_args.metric in ("vqa", "gqa", "pope", "mc")


@pytest.mark.parametrize("pruner", VISION)
def test_every_vision_pruner_composes_by_its_short_name(pruner, tmp_path):
    fragment = tmp_path / f"{pruner}.yaml"
    fragment.write_text(yaml.safe_dump({"model": {"init_args": {"pruner": {"class_path": pruner}}}}))
    cfg = parse_configs([ROOT / "qwen3_vl_8b.yaml", fragment, DATA[0]], [BUDGET, "128"])
    assert cfg.model.init_args.pruner.class_path == import_path(PRUNERS.get(pruner))


@pytest.mark.parametrize("kind", list(RANDOM))
def test_random_fragment_composes_and_its_model_runs(kind):
    """The random model replaces the weights only: hub processor, the model config's max_pixels, a
    random model with the family's vocabulary and token ids that generates on a real image grid."""
    import transformers

    from vlm.backbones import Qwen2_5VLBackbone, Qwen3VLBackbone

    cfg = parse_configs([ROOT / f"{RANDOM[kind]}.yaml", ROOT / "random" / f"{kind}.yaml", DATA[0]])
    init = cfg.model.init_args.backbone.init_args
    _, hub, unit = MODELS[RANDOM[kind]]
    assert init.model is None and init.processor == hub and init.dtype == "float32"
    assert init.max_pixels == 1280 * unit and cfg.trainer.accelerator == "cpu"
    backbone = {"qwen2_5_vl": Qwen2_5VLBackbone, "qwen3_vl": Qwen3VLBackbone}[kind](config=init.config, max_pixels=init.max_pixels)
    model_cfg = backbone.model.config
    assert model_cfg.text_config.vocab_size == 151936 and model_cfg.image_token_id == 151655
    assert (model_cfg.vision_start_token_id, model_cfg.vision_end_token_id) == (151652, 151653)
    patch = model_cfg.vision_config.patch_size
    assert (2 * patch) ** 2 == unit and backbone.patches_per_image == 1280
    image = transformers.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    pix = image([np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)], return_tensors="pt")
    n = int(pix["image_grid_thw"].prod()) // 4
    ids = torch.tensor([[151644, 872, 198, 151652] + [151655] * n + [151653, 3838, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        gen = backbone.runner.generate(ids, pix["pixel_values"], pix["image_grid_thw"], max_new_tokens=2,
                                       hooks=[pruning.create("flowcut", num_tokens=16)])
    assert gen.tokens.shape == (1, 2) and gen.inputs.visual_counts.tolist() == [16]
