"""Every prompt learner on every backbone family, as the README's table says: each cell marked ✓
takes one training step (finite loss, learned tensors get gradients) on a tiny random model of that
family, and each cell marked ✗ is refused with the error its footnote names. The table is read
from the README, so the documentation and the behaviour cannot drift apart."""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from tests.e2e.flow import REPO
from tests.helpers import tiny_clip_cfg
from tests.towers.test_hf_clip_parity import WordTokenizer, clip_config, siglip_config
from tests.towers.test_hf_clip_parity import build as hf_build
from tests.towers.test_timm_family_parity import OPEN_CLIP_TIMM, TINY
from vlm.backbones import ClipBackbone, HFClipBackbone, ViTBackbone
from vlm.modules import CLIPClassifier, ViTClassifier
from vlm.prompts import available, create

CLASSES = ["cat", "sea_lion", "golden retriever dog"]

#: one tiny random model per column of the README table
BACKBONES: dict[str, Callable[[], object]] = {
    "open_clip ViT": lambda: ClipBackbone("tiny", model_cfg=tiny_clip_cfg()),
    "open_clip SigLIP": lambda: ClipBackbone("siglip", model_cfg=OPEN_CLIP_TIMM["siglip"]()),
    "open_clip EVA02-CLIP": lambda: ClipBackbone("eva02_clip", model_cfg=OPEN_CLIP_TIMM["eva02_clip"]()),
    "HF CLIP": lambda: hf_build(clip_config(), "open_clip"),
    "HF SigLIP": lambda: hf_build(siglip_config(1), WordTokenizer()),
    "timm ViT": lambda: ViTBackbone("vit_base_patch16_224", model_kwargs=TINY),
    "timm DINOv2": lambda: ViTBackbone("vit_small_patch14_reg4_dinov2", model_kwargs=TINY),
    "timm EVA02": lambda: ViTBackbone("eva02_base_patch14_224", model_kwargs={**TINY, "ref_feat_shape": (4, 4)}),
    "timm DINOv3": lambda: ViTBackbone("vit_small_patch16_dinov3", model_kwargs={**TINY, "global_pool": "token"}),
}

#: small settings that fit the tiny towers (1-2 text blocks, 2 vision blocks)
SETTINGS: dict[str, dict] = {
    "coop": dict(n_ctx=2, class_token_position="middle"),
    "vpt": dict(num_tokens=2, deep=True),
    "vfpt": dict(num_tokens=2),
    "tcpa": dict(pool_size_cls=4, pool_size_img=4, topk_cls=2, topk_img=2, random_epochs=1),
    "ivlp": dict(depth_text=1, depth_vision=2),
    "maple": dict(depth=1),
    "dpl": dict(depth_text=1, depth_vision=2),
    "dapt": dict(depth=1),
    "disa": dict(depth_text=1, depth_vision=2, sr_templates=["a photo of a {}."]),
    "ktpp": dict(stage_topk=(0.75, 0.5), pyramid=False),
}


def readme_table() -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """``{(method, backbone): cell}`` and ``{footnote letter: error pattern}`` of the README's table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Prompt learners × backbones", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = {}
    for line in rows[2:]:
        parts = [c.strip() for c in line.strip("|").split("|")]
        method = parts[0].strip("`")
        for backbone, cell in zip(header[1:], parts[1:]):
            cells[(method, backbone)] = cell
    notes = dict(re.findall(r"^\* ✗([a-z]): .*?`([^`]+)`", section, re.M))
    return cells, notes


CELLS, NOTES = readme_table()


@lru_cache(maxsize=None)
def backbone(name: str):
    torch.manual_seed(0)
    return BACKBONES[name]()


def one_step(backbone_name: str, method: str) -> None:
    torch.manual_seed(0)
    bb = backbone(backbone_name)
    learner = create(method, **SETTINGS[method])
    if isinstance(bb, ViTBackbone):
        model = ViTClassifier(bb, num_classes=3, prompt_learner=learner)
    else:
        model = CLIPClassifier(bb, learner, classnames=CLASSES)
    if method == "disa":  # what fit_requests would serve before fit
        learner.classnames = CLASSES
        learner.prototypes = F.normalize(torch.randn(3, bb.embed_dim), dim=-1)
    model.train()
    mask = torch.ones(4, 1, 32, 32)
    mask[:, :, :, :16] = 0
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0]), "mask": mask}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Trainer attached: self.log is skipped with a warning
        loss = model.training_step(batch, 0)
    loss.backward()
    learned = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and learned
    assert all(p.grad is not None for p in learned) and any(p.grad.abs().sum() > 0 for p in learned)


def test_the_table_covers_every_learner_and_backbone():
    assert {m for m, _ in CELLS} == set(available()) == set(SETTINGS)
    assert {b for _, b in CELLS} == set(BACKBONES)
    assert all(c == "✓" or (c[:1] == "✗" and c[1:] in NOTES) for c in CELLS.values()), CELLS
    assert HFClipBackbone  # the HF column is this class


@pytest.mark.parametrize("method,backbone_name", sorted(CELLS), ids=lambda x: x.replace(" ", "_"))
def test_learner_on_backbone_as_the_readme_says(method: str, backbone_name: str) -> None:
    cell = CELLS[(method, backbone_name)]
    if cell == "✓":
        one_step(backbone_name, method)
    else:
        with pytest.raises((TypeError, ValueError), match=NOTES[cell[1:]]):
            one_step(backbone_name, method)
