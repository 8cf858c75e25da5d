"""FSDP is not a CPU strategy in Lightning 2.6: the reason docs/data.md gives, checked against the installed Lightning.

If a Lightning upgrade starts accepting FSDP on CPU, these tests fail and docs/data.md (and the
supported-strategy list) must be revisited; until then DDP is the supported multi-process strategy.
"""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.strategies import FSDPStrategy

REFUSAL = "The strategy `fsdp` requires a GPU accelerator"


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload"])
def test_fsdp_by_name_is_refused_on_cpu(strategy: str) -> None:
    with pytest.raises(ValueError, match=REFUSAL):
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)


def test_fsdp_instance_is_refused_on_cpu() -> None:
    with pytest.raises(ValueError, match=REFUSAL):
        L.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)


def test_ddp_is_accepted_on_cpu() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
