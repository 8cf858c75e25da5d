"""The released recipes' precision (``configs/trainer/gpu_fp16_released.yaml``: Lightning's 16-true)
holds the frozen CLIP and the learned prompts in fp16 and trains them there, as Dassl's PREC fp16."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.helpers import short_text_clip
from vlm.modules import CLIPClassifier
from vlm.prompts.coop import CoOp
from vlm.prompts.maple import MaPLe

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "trainer" / "gpu_fp16_released.yaml"


def test_the_config_asks_for_16_true():
    assert yaml.safe_load(CONFIG.read_text())["trainer"]["precision"] == "16-true"


@pytest.mark.parametrize("make", [lambda: CoOp(n_ctx=2), lambda: MaPLe(n_ctx=2, depth=1, ctx_init=None)], ids=["coop", "maple"])
def test_16_true_trains_fp16_prompts_on_fp16_clip(make):
    torch.manual_seed(0)
    bb = short_text_clip()
    learner = make()
    model = CLIPClassifier(bb, learner, classnames=["cat", "dog", "fish"])
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    images = torch.randn(4, 3, bb.image_size, bb.image_size)
    data = [{"image": images[i], "label": torch.tensor(i % 3)} for i in range(4)]
    trainer = L.Trainer(
        accelerator="cpu", precision="16-true", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    assert all(p.dtype == torch.float16 for p in learner.parameters())
    assert all(p.dtype == torch.float16 for p in bb.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(p.detach().float(), before[n].float()) for n, p in learner.named_parameters())
