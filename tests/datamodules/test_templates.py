"""Prompt templates: CoOp's per-dataset templates and CLIP's ImageNet lists."""

from __future__ import annotations

from vlm.datamodules.templates import (
    CUSTOM_TEMPLATES,
    IMAGENET_CLASSNAMES,
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    template_for,
)


def test_custom_templates() -> None:
    assert CUSTOM_TEMPLATES["OxfordPets"] == "a photo of a {}, a type of pet."
    assert CUSTOM_TEMPLATES["DescribableTextures"] == "{} texture."
    assert CUSTOM_TEMPLATES["EuroSAT"] == "a centered satellite photo of {}."
    assert CUSTOM_TEMPLATES["Food101"] == "a photo of {}, a type of food."
    assert CUSTOM_TEMPLATES["UCF101"] == "a photo of a person doing {}."
    assert template_for("Caltech101") == "a photo of a {}."
    assert template_for("SomethingNew") == "a photo of a {}."
    for t in CUSTOM_TEMPLATES.values():
        assert t.count("{}") == 1


def test_imagenet_templates() -> None:
    assert len(IMAGENET_TEMPLATES) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert "itap of a {}." in IMAGENET_TEMPLATES
    assert IMAGENET_TEMPLATES_SELECT == [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ]
    assert all(t.format("dog").count("dog") == 1 for t in IMAGENET_TEMPLATES)
    assert len(IMAGENET_CLASSNAMES) == 1000
