"""Behaviour shared by every vlm LightningModule: learned-only checkpoints with identity checks.

* ``state_dict()`` holds only trainable parameters (the frozen backbone is referenced by identity
  and checksum, never copied), so a prompt learner's checkpoint is kilobytes, not a CLIP.
* Loading checks that every trainable tensor is restored and nothing unknown is present.
* ``on_save_checkpoint`` records the backbone identity/checksum and the method; loading a
  checkpoint made with another backbone or method fails with a message naming both.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Optional

import lightning as L
from torch import Tensor, nn

from vlm.runtime.identity import CHECKPOINT_KEY, FORMAT_VERSION, CheckpointMismatchError, check_identity
from vlm.modules.optim import build_optimizer, trainer_lr_scheduler
from vlm.runtime.reliability import check_finite_losses


class LearnedOnlyModule(L.LightningModule):
    """Subclasses set ``self.backbone`` and ``self.method_name``."""

    backbone: nn.Module
    method_name: str = "none"

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False  # the frozen backbone is absent from checkpoints by design

    # --- what is learned ----------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n in self.trainable_names()}
        return OrderedDict((k, v) for k, v in full.items() if k in keep)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        expected = set(self.trainable_names())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - set(dict(self.named_parameters())) - set(dict(self.named_buffers())))
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"Checkpoint does not match {type(self).__name__} ({self.method_name}): "
                f"missing learned tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
                "Load it into the same method and prompt settings that produced it."
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # --- numerical guard ----------------------------------------------------------------------
    def check_finite(self, terms: Mapping[str, Tensor], stage: str) -> None:
        """Stop the run with an error naming the step and the term if a loss term is NaN or inf."""
        check_finite_losses(terms, self.global_step, stage, self.current_epoch)

    # --- optimisation -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        learner = getattr(self, "prompt_learner", None)
        if learner is not None:
            learner.on_train_epoch_start(self.current_epoch)

    def configure_optimizers(self) -> Any:
        """Only trainable parameters reach the optimiser (``self.optim``: an OptimConfig)."""
        opt = build_optimizer((p for p in self.parameters() if p.requires_grad), self.optim)
        return {"optimizer": opt, "lr_scheduler": trainer_lr_scheduler(opt, self.optim, self.trainer)}

    # --- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "method": self.method_name,
            "module": type(self).__name__,
            "backbone": self.backbone.identity(),
            "backbone_checksum": self.backbone.checksum(),
        }

    #: The resolved run config (set by the CLI), stored in checkpoints so exports can rebuild the run.
    run_config: Optional[dict[str, Any]] = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = self.identity()
        record["config"] = self.run_config
        record["classnames"] = list(getattr(self, "classnames", None) or []) or None
        record["test_classnames"] = dict(getattr(self, "test_classnames", None) or {}) or None
        checkpoint[CHECKPOINT_KEY] = record

    def load_exported(self, directory: str) -> None:
        """Load the learned tensors of a ``vlm export`` directory (identity-checked)."""
        from vlm.runtime.export import load_exported

        load_exported(self, directory)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_identity(checkpoint.get(CHECKPOINT_KEY), self.identity(), source="checkpoint")


def accuracy_percent(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean() * 100.0
