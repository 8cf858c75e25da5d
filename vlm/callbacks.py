"""Callbacks shipped with vlm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import Tensor

from vlm.modules.clip_classifier import CLIPClassifier, harmonic_mean


class BaseNewReport(L.Callback):
    """Zero-shot vs tuned accuracy on base, new and their harmonic mean, around ``fit``.

    Before training it evaluates the frozen CLIP with the datamodule's hand-written template (no
    prompts: the zero-shot baseline of the papers); after training it evaluates the tuned model.
    Both use the datamodule's test loaders, one per class subset. The table is printed and saved as
    ``base_new_report.json`` in the log directory.
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
        self.rows[f"tuned ({pl_module.method_name})"] = self._evaluate(trainer, pl_module, prompts=True)
        self._print(trainer)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / self.filename).write_text(json.dumps(self.rows, indent=1))

    def _print(self, trainer: Optional[L.Trainer]) -> None:
        from rich.console import Console
        from rich.table import Table

        cols = sorted({k for r in self.rows.values() for k in r}, key=["base", "new", "all", "hm"].index)
        table = Table(title="accuracy (%) on held-out test images")
        table.add_column("model")
        for c in cols:
            table.add_column(c.upper() if c == "hm" else c, justify="right")
        for name, row in self.rows.items():
            table.add_row(name, *(f"{row[c]:.2f}" if c in row else "-" for c in cols))
        Console().print(table)
