"""Callbacks shipped with vlm: the base/new report around ``fit`` and the per-stage config saver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from vlm.metrics import harmonic_mean
from vlm.modules.clip_classifier import CLIPClassifier


class BaseNewReport(L.Callback):
    """Zero-shot vs tuned accuracy on base, new and their harmonic mean, around ``fit``.

    Before training it evaluates the frozen CLIP with the datamodule's hand-written template (no
    prompts: the zero-shot baseline of the papers); after training it evaluates the tuned model.
    Both use the datamodule's test loaders, one per class subset; under DDP those are sharded per
    rank (each sample counted once) and the counts are summed over ranks before the accuracy is
    taken. The table is printed and saved as ``base_new_report.json`` in the log directory.
    """

    def __init__(self, filename: str = "base_new_report.json") -> None:
        self.filename = filename
        self.rows: dict[str, dict[str, float]] = {}

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, module: CLIPClassifier, prompts: bool) -> dict[str, float]:
        dm = trainer.datamodule
        dm.setup("test")
        was_training = module.training
        module.eval()
        accs: dict[str, float] = {}
        for subset, loader in zip(dm.test_subsets, dm.test_dataloader()):
            names = dm.test_classnames[subset]
            if prompts:
                text = module.class_features(names)
            else:
                tokens = module.backbone.tokenize([module.template.format(c.replace("_", " ")) for c in names])
                text = module.backbone.encode_text(tokens.to(module.device), normalize=True)
            correct = total = 0
            for batch in loader:
                images: Tensor = batch["image"].to(module.device)
                image = module.backbone.encode_image(images, module.hooks if prompts else None, normalize=True)
                pred = (image @ text.t()).argmax(-1).cpu()
                correct += int((pred == batch["label"]).sum())
                total += int(batch["label"].numel())
            # under DDP each rank saw its own shard (exact_eval_sampler): sum the counts over ranks
            counts = trainer.strategy.reduce(torch.tensor([correct, total], device=module.device), reduce_op="sum")
            correct, total = (int(c) for c in counts.tolist())
            accs[subset] = 100.0 * correct / max(1, total)
        if "base" in accs and "new" in accs:
            accs["hm"] = harmonic_mean(accs["base"], accs["new"])
        module.train(was_training)
        return accs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, CLIPClassifier):
            raise TypeError("BaseNewReport works with CLIPClassifier models.")
        self.rows["zero-shot CLIP"] = self._evaluate(trainer, pl_module, prompts=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows[self.tuned_label(trainer, pl_module)] = self._evaluate(trainer, pl_module, prompts=True)
        # Lightning stops its (rich) progress bar only in `teardown`, after on_fit_end: stop it now,
        # or its last refresh redraws over the table (teardown is idempotent for the bar).
        bar = trainer.progress_bar_callback
        if bar is not None:
            bar.teardown(trainer, pl_module, "fit")
        self._print(trainer)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / self.filename).write_text(json.dumps(self.rows, indent=1))

    @staticmethod
    def tuned_label(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """``tuned (<method>)`` after at least one optimiser step; ``untrained (<method>, 0 steps)``
        otherwise (``max_epochs 0``, or no batch), so initial prompts are never labelled tuned."""
        if trainer.global_step > 0:
            return f"tuned ({pl_module.method_name})"
        rank_zero_warn(
            f"BaseNewReport: fit made no optimiser step (max_epochs={trainer.max_epochs}); the {pl_module.method_name} "
            "row is the untrained initial prompts."
        )
        return f"untrained ({pl_module.method_name}, 0 steps)"

    def _print(self, trainer: Optional[L.Trainer]) -> None:
        """The table, on rich's shared console (the one a rich progress bar draws on)."""
        from rich import get_console
        from rich.table import Table

        cols = sorted({k for r in self.rows.values() for k in r}, key=["base", "new", "all", "hm"].index)
        table = Table(title="accuracy (%) on held-out test images")
        table.add_column("model")
        for c in cols:
            table.add_column(c.upper() if c == "hm" else c, justify="right")
        for name, row in self.rows.items():
            table.add_row(name, *(f"{row[c]:.2f}" if c in row else "-" for c in cols))
        if trainer is None or trainer.is_global_zero:
            get_console().print(table)


class StageConfigCallback(SaveConfigCallback):
    """LightningCLI's config saver, writing ``config_<stage>.yaml`` (``config_fit.yaml``,
    ``config_test.yaml``) and ``config_<stage>.<n>.yaml`` when that file exists (a requeued or
    repeated stage), so a ``vlm test`` after ``fit`` or a resume never overwrites an earlier run's
    config. ``saved_path`` is the file written (rank 0), which ``results.json`` cites."""

    saved_path: Optional[Path] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every rank calls it
            if trainer.is_global_zero:
                self.config_filename = free_name(log_dir, f"config_{getattr(stage, 'value', stage)}.yaml").name
                self.saved_path = log_dir / self.config_filename
        super().setup(trainer, pl_module, stage)


def free_name(folder: Path, filename: str) -> Path:
    """``folder/filename`` if it does not exist, else the first free ``stem.<n>.suffix`` (n = 1, 2, ...)."""
    path = folder / filename
    n = 0
    while path.exists():
        n += 1
        path = folder / f"{Path(filename).stem}.{n}{Path(filename).suffix}"
    return path
