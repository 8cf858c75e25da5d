"""The backbone configs document local weights, random weights and the image-size rule, and what
they document works: each config's commented `model_cfg:`/`model_kwargs:`/`config:` example builds a random
model, a local file of that model's weights loads into it bit for bit, and data at another size
than the backbone's is an error naming both sizes."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from tests.e2e.flow import REPO
from tests.towers.test_hf_clip_parity import WordTokenizer
from vlm.backbones import ClipBackbone, HFClipBackbone, ViTBackbone
from vlm.runtime.links import check_image_size

CONFIGS = sorted((REPO / "configs" / "backbone").glob("*.yaml"))
#: per backbone class: the argument that names local weights, and the one a random model is built from
KEYS = {
    "vlm.backbones.ClipBackbone": ("pretrained", "model_cfg"),
    "vlm.backbones.ViTBackbone": ("checkpoint_path", "model_kwargs"),
    "vlm.backbones.HFClipBackbone": ("model_name", "config"),
}


def _comments(path: Path) -> str:
    return "\n".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))


def _example(path: Path, key: str) -> dict:
    """The commented one-line YAML example `key: {...}` of a backbone config."""
    match = re.search(rf"^{key}: (\{{.*\}})$", _comments(path), re.M)
    assert match, f"{path.name} has no `{key}:` example"
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_backbone_config_documents_weights_and_image_size(path: Path) -> None:
    text = _comments(path)
    backbone = yaml.safe_load(path.read_text())["model"]["init_args"]["backbone"]
    local_key, example_key = KEYS[backbone["class_path"]]
    assert re.search(rf"--model\.init_args\.backbone\.init_args\.{local_key} /\S+", text), "a local weights file"
    assert "Random weights" in text and example_key in text
    size = re.search(r"Image size\. The data's image size .* must be the\s+backbone's input size: (\d+) here", text, re.S)
    assert size, "an image-size sentence"
    expected = model_image_size(backbone)
    assert expected is None or int(size.group(1)) == expected, f"the sentence says {size.group(1)} px, the model takes {expected}"
    assert "names both sizes" in text


def model_image_size(backbone: dict) -> int | None:
    """The input size of a config's model, read from the libraries' registries without building
    it: open_clip's model config, or timm's ``img_size`` kwarg / pretrained config; None for other
    backbone classes."""
    args = backbone.get("init_args", {})
    if backbone["class_path"] == "vlm.backbones.ClipBackbone":
        cfg = args.get("model_cfg") or open_clip.get_model_config(args["model_name"])
        return int(cfg["vision_cfg"]["image_size"])
    if backbone["class_path"] == "vlm.backbones.ViTBackbone":
        size = (args.get("model_kwargs") or {}).get("img_size")
        return int(size) if size else int(timm.models.get_pretrained_cfg(args["model_name"]).input_size[-1])
    return None


BUILDABLE = [p for p in CONFIGS if yaml.safe_load(p.read_text())["model"]["init_args"]["backbone"]["class_path"] in KEYS]


@pytest.mark.parametrize("path", BUILDABLE, ids=lambda p: p.name)
def test_backbone_config_random_example_builds_and_runs(path: Path) -> None:
    """Each config's commented random-weights example builds a model of the config's class that
    takes images of the example's own size."""
    backbone = yaml.safe_load(path.read_text())["model"]["init_args"]["backbone"]
    name = backbone["init_args"]["model_name"]
    torch.manual_seed(0)
    if backbone["class_path"].endswith("HFClipBackbone"):
        cfg = _example(path, "config")
        tokenizer = "open_clip" if cfg["model_type"] == "clip" else WordTokenizer()  # offline stand-ins
        model, size = HFClipBackbone(name, config=cfg, tokenizer=tokenizer), cfg["vision_config"]["image_size"]
    elif backbone["class_path"].endswith("ClipBackbone"):
        cfg = _example(path, "model_cfg")
        model, size = ClipBackbone(name, pretrained=None, model_cfg=cfg), cfg["vision_cfg"]["image_size"]
    else:
        kwargs = _example(path, "model_kwargs")
        model, size = ViTBackbone(name.split(".")[0], pretrained=False, model_kwargs=kwargs), kwargs["img_size"]
    assert model.image_size == size
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, size, size)).shape == (1, model.feature_dim)


def test_clip_random_model_cfg_and_local_weights_file(tmp_path: Path) -> None:
    cfg = _example(REPO / "configs" / "backbone" / "clip_vit_b16.yaml", "model_cfg")
    random_clip = ClipBackbone("tiny", pretrained=None, model_cfg=cfg)
    assert random_clip.image_size == cfg["vision_cfg"]["image_size"]
    weights = tmp_path / "tiny_clip.pt"
    torch.save(random_clip.model.state_dict(), weights)
    torch.manual_seed(123)  # a different random init, which the file must replace entirely
    loaded = ClipBackbone("tiny", pretrained=str(weights), model_cfg=cfg)
    for name, value in random_clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    with pytest.raises(ValueError, match=r"data gives 64 px images .* backbone 'tiny' takes 32 px"):
        check_image_size(loaded, SimpleNamespace(transforms=SimpleNamespace(image_size=64)))


def test_vit_random_model_kwargs_and_local_checkpoint_path(tmp_path: Path) -> None:
    kwargs = _example(REPO / "configs" / "backbone" / "vit_b16_in21k.yaml", "model_kwargs")
    random_vit = ViTBackbone("vit_base_patch16_224", pretrained=False, model_kwargs=kwargs)
    weights = tmp_path / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in random_vit.model.state_dict().items()}, str(weights))
    torch.manual_seed(123)
    loaded = ViTBackbone("vit_base_patch16_224", checkpoint_path=str(weights), model_kwargs=kwargs)
    for name, value in random_vit.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    check_image_size(loaded, SimpleNamespace(transforms=SimpleNamespace(image_size=kwargs["img_size"])))
    with pytest.raises(ValueError, match=rf"data gives 224 px images .* takes {kwargs['img_size']} px"):
        check_image_size(loaded, SimpleNamespace(transforms=SimpleNamespace(image_size=224)))
