"""Numerical guards: a NaN/inf loss term stops the run naming step and term; mixed precision on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.datamodules.toydata import make_dataset
from tests.reliability.helpers import coop_module, toy_datamodule, trainer
from vlm.prompts.coop import CoOp
from vlm.runtime.reliability import NonFiniteLossError, check_finite_losses


class NaNAfter(CoOp):
    """CoOp whose extra loss term ``blowup`` becomes NaN from global step ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__(n_ctx=4)
        self.at = at
        self.calls = 0

    def losses(self, outputs: dict, batch: dict, encoder=None) -> dict:
        value = outputs["logits"].sum() * 0.0 + (float("nan") if self.calls >= self.at else 0.0)
        self.calls += 1
        return {"blowup": value}


def test_nan_loss_term_stops_the_run_naming_step_and_term(tmp_path: Path) -> None:
    toy = make_dataset(tmp_path / "toy")
    module = coop_module(prompt_learner=NaNAfter(at=2))
    before = None
    with pytest.raises(NonFiniteLossError, match=r"Non-finite train loss at global step 2 \(epoch 0\): term 'blowup' = nan"):
        t = trainer(tmp_path / "run", max_epochs=3, enable_checkpointing=False, limit_val_batches=0)
        before = module.prompt_learner.ctx.detach().clone()
        t.fit(module, datamodule=toy_datamodule(toy))
    assert before is not None and bool(torch.isfinite(module.prompt_learner.ctx).all()), "no NaN step was applied"


def test_inf_term_is_named_among_finite_ones() -> None:
    terms = {"ce": torch.tensor(1.0), "kd": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError, match=r"global step 7: term 'kd' = inf \(all terms: \['ce', 'kd'\]\)"):
        check_finite_losses(terms, step=7)
    check_finite_losses({"ce": torch.tensor(1.0)}, step=7)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fits_coop_on_cpu(precision: str, tmp_path: Path) -> None:
    toy = make_dataset(tmp_path / "toy")
    module = coop_module()
    start = module.prompt_learner.ctx.detach().clone()
    t = trainer(tmp_path / "run", precision=precision, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    t.fit(module, datamodule=toy_datamodule(toy))
    ctx = module.prompt_learner.ctx
    assert t.global_step == 3 and ctx.dtype == torch.float32, "prompt parameters stay fp32 under autocast"
    assert bool(torch.isfinite(ctx).all()) and not torch.equal(ctx.detach(), start)
