"""Hand-written prompt templates: CoOp's per-dataset `CUSTOM_TEMPLATES` and CLIP's ImageNet lists.

`CUSTOM_TEMPLATES` is CoOp `trainers/zsclip.py` (the zero-shot CLIP baseline of the
base-to-new tables), keyed by the split-file / Dassl dataset name. `IMAGENET_TEMPLATES` (80)
and `IMAGENET_TEMPLATES_SELECT` (7) are the CLIP notebook lists that CoOp keeps in
`trainers/imagenet_templates.py`; we read them from open_clip's `zero_shot_metadata.py` (a
dependency-free file) without importing the open_clip package, which is slow to import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
    "MNIST": "a photo of the digit {}.",  # ours (the offline quickstart), not in CoOp
}
DEFAULT_TEMPLATE = "a photo of a {}."


def _open_clip_metadata() -> ModuleType:
    """Load open_clip/zero_shot_metadata.py by file path, skipping the package's heavy __init__."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("open_clip is required for the ImageNet template lists: pip install open-clip-torch")
    path = Path(spec.origin).parent / "zero_shot_metadata.py"
    mod_spec = importlib.util.spec_from_file_location("_vlm_open_clip_zero_shot_metadata", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"Cannot load open_clip's template file '{path}'.")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


_META = _open_clip_metadata()
# The lambdas `lambda c: f"... {c} ..."` become format strings "... {} ...".
IMAGENET_TEMPLATES: list[str] = [t("{}") for t in _META.OPENAI_IMAGENET_TEMPLATES]
IMAGENET_TEMPLATES_SELECT: list[str] = [t("{}") for t in _META.SIMPLE_IMAGENET_TEMPLATES]
IMAGENET_CLASSNAMES: list[str] = list(_META.IMAGENET_CLASSNAMES)
del _META


def template_for(dataset: str) -> str:
    """CoOp's zero-shot template of a dataset; "a photo of a {}." for datasets it does not list."""
    return CUSTOM_TEMPLATES.get(dataset, DEFAULT_TEMPLATE)
