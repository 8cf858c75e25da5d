"""Callbacks shipped with vlm: the base/new report around ``fit``, the per-stage config saver, and
the defaults the ``vlm`` CLI adds when a config does not choose its own (:func:`default_callbacks`):
a ``ModelCheckpoint`` that also writes ``last.ckpt`` (so ``--ckpt_path last`` names a file), a
progress bar without Lightning's ``v_num`` (the logger version, which says nothing about training),
a model summary without Lightning's FLOPs column (zeros: Lightning counts FLOPs only for a module
with an ``example_input_array``), and, for ``vlm predict``, the writer of ``predictions.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from vlm.datamodules.protocols import LabelledData
from vlm.metrics import harmonic_mean

if TYPE_CHECKING:
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
    def _evaluate(self, trainer: L.Trainer, module: "CLIPClassifier", prompts: bool) -> dict[str, float]:
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
        from vlm.modules.clip_classifier import CLIPClassifier

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


class ProgressBarNoVersion(RichProgressBar):
    """Lightning's rich progress bar without ``v_num`` (the logger's version number)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class ModelSummaryNoFlops(RichModelSummary):
    """Lightning's rich model summary without the FLOPs column and total (all zeros for vlm's
    modules, which have no ``example_input_array`` for Lightning to count with)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device", "In sizes", "Out sizes") else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", str(total_training_modes["train"])),
            ("Modules in eval mode", str(total_training_modes["eval"])),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)


class PredictionWriter(BasePredictionWriter):
    """Writes what ``vlm predict`` predicts into the log folder, one JSON line per image:
    ``{"index", "path", "class", "class_index", "score"}`` for a classifier (``score``: the softmax
    probability of the predicted class), or the module's own records (LLaVA: ``question_id``,
    ``text``). The file is ``predictions.jsonl`` (``predictions.<n>.jsonl`` when one is there already;
    ``predictions.rank<r>.jsonl`` per rank under DDP); ``path`` is set when the data lists its images."""

    def __init__(self, filename: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: Optional[Path] = None
        self.count = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every rank calls it
        name = self.filename if trainer.world_size == 1 else f"{Path(self.filename).stem}.rank{trainer.global_rank}.jsonl"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path, self.count = free_name(log_dir, name), 0
        self.path.write_text("")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:  # fmt: skip
        rows = prediction_rows(prediction, classnames=_classnames(trainer.datamodule),
                               dataset=_predict_dataset(trainer, dataloader_idx))  # fmt: skip
        if self.path is None or not rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.count += len(rows)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path is not None:
            print(f"vlm predict: wrote {self.count} predictions to {self.path}")


def _classnames(datamodule: Any) -> Optional[list[str]]:
    return list(datamodule.classnames) if isinstance(datamodule, LabelledData) else None


def _predict_dataset(trainer: L.Trainer, dataloader_idx: int) -> Any:
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    return getattr(loaders, "dataset", None)


def _items(value: Any) -> list[Any]:
    if value is None:
        return []
    return value.tolist() if hasattr(value, "tolist") else list(value)


def prediction_rows(prediction: Any, classnames: Optional[list[str]] = None, dataset: Any = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per image of a ``predict_step`` output: a classifier's
    ``{"pred", "confidence", "index"[, "classnames"]}``, or a list of the module's own records."""
    if isinstance(prediction, list):
        return [dict(p) if isinstance(p, dict) else {"prediction": str(p)} for p in prediction]
    if not isinstance(prediction, dict) or "pred" not in prediction:
        return [{"prediction": str(prediction)}]
    names = prediction.get("classnames") or classnames or []
    preds, scores, indices = _items(prediction["pred"]), _items(prediction.get("confidence")), _items(prediction.get("index"))
    items = getattr(dataset, "items", None)
    rows = []
    for i, pred in enumerate(preds):
        row: dict[str, Any] = {}
        if i < len(indices):
            row["index"] = int(indices[i])
            if items is not None and 0 <= row["index"] < len(items) and hasattr(items[row["index"]], "impath"):
                row["path"] = str(items[row["index"]].impath)
        row["class"] = names[int(pred)] if int(pred) < len(names) else None
        row["class_index"] = int(pred)
        if i < len(scores):
            row["score"] = float(scores[i])
        rows.append(row)
    return rows


def default_callbacks(subcommand: Optional[str], configured: list[type], trainer: dict[str, Any]) -> list[L.Callback]:
    """What the ``vlm`` CLI adds to a run whose config does not choose its own (``configured``: the
    classes of the configured callbacks; ``trainer``: the trainer's parsed arguments):

    * a ``ModelCheckpoint(save_last=True)`` when checkpointing is on, so ``last.ckpt`` exists for
      ``--ckpt_path last`` (Lightning's default ``ModelCheckpoint`` writes none);
    * :class:`ProgressBarNoVersion` and :class:`ModelSummaryNoFlops` where Lightning would add its own;
    * :class:`PredictionWriter` for ``vlm predict``.
    """
    def has(kind: type) -> bool:
        return any(isinstance(c, type) and issubclass(c, kind) for c in configured)

    out: list[L.Callback] = []
    if trainer.get("barebones"):  # Lightning refuses these callbacks with barebones=True
        return [PredictionWriter()] if subcommand == "predict" and not has(BasePredictionWriter) else []
    if trainer.get("enable_checkpointing") is not False and not has(ModelCheckpoint):
        out.append(ModelCheckpoint(save_last=True))
    if trainer.get("enable_progress_bar") is not False and not has(ProgressBar):
        out.append(ProgressBarNoVersion())
    if trainer.get("enable_model_summary") is not False and not has(ModelSummary):
        out.append(ModelSummaryNoFlops())
    if subcommand == "predict" and not has(BasePredictionWriter):
        out.append(PredictionWriter())
    return out
