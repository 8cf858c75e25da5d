"""Runs that used to report a wrong result without a word now refuse, skip with a message, or
record what they did (issue 15, "no silent wrong result"). The 16-bit PNG case is in
tests/datamodules/test_transforms.py; the non-zero exit after a preemption in
tests/reliability/test_preemption.py and tests/distributed/test_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.datamodules.toydata import make_dataset
from tests.e2e.flow import readme_flow, results, run, versions
from tests.helpers import tiny_clip_cfg
from tests.reliability.helpers import coop_module, toy_datamodule, trainer, write_cli_config
from vlm.backbones import ClipBackbone
from vlm.runtime.callbacks import BaseNewReport
from vlm.runtime.cli import main
from vlm.modules import ViTClassifier
from vlm.runtime.results import UntrainedModelError, collect_results


def _without_ckpt(command: list[str]) -> list[str]:
    i = command.index("--ckpt_path")
    return command[:i] + command[i + 2 :]


def test_testing_learned_parts_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """`vlm test` with CoOp but no --ckpt_path would score the random context: refused, naming the
    fix; `--allow_untrained true` tests it with a warning and says so in results.json."""
    test = _without_ckpt(readme_flow("dtd", tmp_path).commands[1])
    with pytest.raises(UntrainedModelError, match=r"coop.*neither --ckpt_path nor model.init_args.init_from.*--allow_untrained"):
        run(test)
    with pytest.warns(UserWarning, match=r"testing the UNTRAINED learned parameters"):
        run([*test, "--allow_untrained", "true"])
    record = results(versions(tmp_path / "runs")[-1])["checkpoint"]
    assert record["untrained"] is True and record["ckpt_path"] is None and record["init_from"] is None


def test_zero_shot_clip_needs_no_checkpoint(tmp_path: Path) -> None:
    """Nothing is learned without a prompt learner: zero-shot CLIP tests as it is."""
    flow = readme_flow("dtd", tmp_path)
    zero_shot = tmp_path / "zero_shot.yaml"
    zero_shot.write_text(yaml.safe_dump({"model": {"init_args": {"prompt_learner": None}}}))
    run([*_without_ckpt(flow.commands[1]), "--config", str(zero_shot)])
    tested = results(versions(flow.runs)[-1])
    assert tested["method"] == "zeroshot" and tested["checkpoint"]["untrained"] is False
    assert set(tested["metrics"]) == {"test/acc_base", "test/acc_new", "test/hm"}


def test_vit_head_does_not_score_relabelled_new_classes(tmp_path: Path) -> None:
    """A linear head trained on the base classes cannot name the new ones (relabelled from 0):
    `test/acc_new` is not reported; the subset is skipped with a warning and listed in results.json."""
    dm = toy_datamodule(make_dataset(tmp_path / "toy"), subsample="base", test_subsets=["base", "new"])
    model = ViTClassifier(ClipBackbone("tiny", model_cfg=tiny_clip_cfg()), num_classes=dm.num_classes)
    t = trainer(tmp_path / "run", max_steps=1)
    t.fit(model, datamodule=dm)
    with pytest.warns(UserWarning, match=r"test subset 'new' is skipped, not scored: its 2 classes .* base-class head"):
        t.test(model, datamodule=dm, verbose=False)
    record = collect_results(t, model, None, None)
    assert set(record["metrics"]) == {"test/acc_base"}
    assert list(record["model"]["skipped_subsets"]) == ["new"]


def test_more_shots_than_a_class_has_warns_and_records_the_shots_used(tmp_path: Path) -> None:
    """Class 'eel' of the toy data has 2 train images; num_shots=4 uses both, says so, and
    results.json records the shots actually used."""
    cfg = write_cli_config(tmp_path, make_dataset(tmp_path / "toy"), tmp_path / "run", num_shots=4, subsample="all",
                           test_subsets=["all"])  # fmt: skip
    with pytest.warns(UserWarning, match=r"num_shots=4, but 1 of 5 classes .* \('eel': 2\)"):
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "1"])
    ckpt = next((tmp_path / "run" / "v0" / "checkpoints").glob("*.ckpt"))
    main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    shots = json.loads((tmp_path / "run" / "v0" / "results.json").read_text())["data"]["shots_used"]
    assert shots == {"requested": 4, "min": 2, "max": 4, "classes_below_requested": {"eel": 2}, "num_classes_below_requested": 1}


def test_negative_num_shots_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"num_shots must be a whole number >= 0 .* got -1"):
        toy_datamodule(make_dataset(tmp_path / "toy"), num_shots=-1)


def test_zero_epochs_are_not_labelled_tuned(tmp_path: Path) -> None:
    """`--trainer.max_epochs 0`: BaseNewReport's second row is the untrained prompts, named so."""
    report = BaseNewReport()
    t = trainer(tmp_path / "run", max_epochs=0, callbacks=[report])
    with pytest.warns(UserWarning, match=r"fit made no optimiser step \(max_epochs=0\)"):
        t.fit(coop_module(), datamodule=toy_datamodule(make_dataset(tmp_path / "toy")))
    assert list(report.rows) == ["zero-shot CLIP", "untrained (coop, 0 steps)"]
    saved = json.loads((tmp_path / "run" / "base_new_report.json").read_text())
    assert "tuned (coop)" not in saved and saved["untrained (coop, 0 steps)"] == report.rows["untrained (coop, 0 steps)"]
