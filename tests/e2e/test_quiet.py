"""Quiet, readable output (issue 15): the README flow warns only about what the data itself is
(here: tiny), `vlm test` prints each metric once, the HF text tower's by-design load report and the
frozen backbone's eval-mode warning are gone (and only those), and BaseNewReport's table is printed
after the progress bar has stopped, so the bar cannot draw over it."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import rich
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn

from tests.datamodules.toydata import make_dataset
from tests.e2e.flow import readme_flow, resolve, run, versions
from tests.reliability.helpers import coop_module, toy_datamodule
from vlm.runtime.callbacks import BaseNewReport
from vlm.runtime.quiet import frozen_eval_modules, is_pooler_only_report

#: What a one-step run on a 6-image dataset is rightly warned about (the data, not vlm).
TINY_DATA_WARNINGS = (
    r"num_shots=16, but 2 of 2 classes .* have fewer train images",
    r"The number of training batches \(\d\) is smaller than the logging interval",
)


def test_readme_flow_warns_only_about_the_data_and_prints_each_metric_once(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """No LightningCLI "args" warning (every `vlm` call passes argv on), no "No seed found", no
    eval-mode warning for the frozen CLIP, no tensorboardX or LeafSpec notice, no "dirpath has
    changed" when testing another run's checkpoint; and one table with one row per metric instead
    of Lightning's, which repeats every metric under "DataLoader 0" and "DataLoader 1"."""
    flow = readme_flow("dtd", tmp_path, log_every_n_steps=10)
    run(flow.commands[0])
    ckpt = next((versions(flow.runs)[0] / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    run(resolve(flow.commands[1], ckpt))
    out = capsys.readouterr().out
    shown = [w for w in recwarn if not issubclass(w.category, DeprecationWarning)]  # Python hides these outside __main__
    unexpected = [f"{w.category.__name__}: {w.message}" for w in shown if not any(re.search(p, str(w.message)) for p in TINY_DATA_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)
    assert "DataLoader" not in out
    for metric in ("test/acc_base", "test/acc_new", "test/hm"):
        assert out.count(metric) == 1, out


def test_hf_text_tower_load_report_is_dropped_only_when_pooler_only(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip builds the MiniLM text tower without BERT's pooler (mean pooling), so transformers
    reports `pooler.*` as UNEXPECTED on every quickstart run; vlm drops exactly that report."""
    import vlm.backbones.clip as clip_module
    from vlm.quickstart import QuickstartCLIP

    caplog.set_level(logging.WARNING)
    QuickstartCLIP(weights=None)
    assert "LOAD REPORT" not in caplog.text
    monkeypatch.setattr(clip_module, "quiet_hf_text_load", contextlib.nullcontext)
    QuickstartCLIP(weights=None)
    assert re.search(r"pooler\.dense\.weight +\| UNEXPECTED", caplog.text), "the report this filter exists for"

    report = "BertModel LOAD REPORT from: x\nKey | Status |\n----+----\n{rows}\nNotes: ..."
    assert is_pooler_only_report(report.format(rows="pooler.dense.bias | UNEXPECTED |\npooler.dense.weight | UNEXPECTED |"))
    assert not is_pooler_only_report(report.format(rows="pooler.dense.bias | UNEXPECTED |\nencoder.layer.0.x | MISSING |"))
    assert not is_pooler_only_report("some other message")


def test_eval_mode_warning_is_dropped_only_for_frozen_modules() -> None:
    """The count Lightning warns about is ignored only when every module that stays in eval mode
    is frozen; a module that trains in eval mode keeps the warning (count 0 = nothing ignored)."""

    class Frozen(nn.Module):
        def __init__(self, trainable: bool) -> None:
            super().__init__()
            self.tower = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
            self.tower.requires_grad_(trainable)
            self.head = nn.Linear(2, 2)

        def train(self, mode: bool = True) -> "Frozen":
            super().train(mode)
            self.tower.eval()  # as vlm's frozen backbones do
            return self

    assert frozen_eval_modules(Frozen(trainable=False)) == 3
    assert frozen_eval_modules(Frozen(trainable=True)) == 0


def test_base_new_table_is_not_overdrawn_by_the_progress_bar(tmp_path: Path) -> None:
    """Lightning stops its rich progress bar in `teardown`, after `on_fit_end`, where the table is
    printed; a live bar then redraws (cursor up, erase line) over the table's last lines."""
    buffer = io.StringIO()
    bar = RichProgressBar(refresh_rate=1, console_kwargs={"file": buffer, "force_terminal": True, "width": 100})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[BaseNewReport(), bar])  # fmt: skip
    try:
        trainer.fit(coop_module(), datamodule=toy_datamodule(make_dataset(tmp_path / "toy")))
    finally:
        rich.reconfigure()  # the bar replaced rich's shared console; give later tests a default one
    text = buffer.getvalue()
    assert "accuracy (%) on held-out test images" in text and "Epoch 0" in text
    after = text[text.index("accuracy (%) on held-out test images") :]
    assert "tuned (coop)" in after
    assert "\x1b[1A" not in after and "\x1b[2K" not in after, "the progress bar drew after the table"
