"""README "Using it", end to end, for each of the 11 CoOp datasets' data configs:

    vlm fit    --config backbone --config prompt --config data --config trainer
    vlm test   ...same configs... --ckpt_path <fit's checkpoint>
    vlm export --ckpt <fit's checkpoint> --out <dir>
    vlm test   --config <dir>/config.yaml

read from README.md itself (tests/e2e/flow.py) and run on a generated tiny layout, a tiny random
CLIP and one training step. The class template comes from the data config (linked into the
model), so datasets with their own template (pets, DTD, EuroSAT, ...) run like the others; a
model template that disagrees with it, and data at another image size than the backbone's, are
errors that name both values.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.e2e.flow import COOP_DATASETS, REPO, readme_flow, resolve, results, run, versions
from vlm.runtime.cli import VLMCLI
from vlm.runtime.links import LinkedValueError, check_linked_values


@pytest.mark.parametrize("dataset", COOP_DATASETS)
def test_readme_flow(dataset: str, tmp_path: Path) -> None:
    flow = readme_flow(dataset, tmp_path)
    fit, test, export, test_export = flow.commands
    assert [c[0] for c in flow.commands] == ["fit", "test", "export", "test"]

    data_template = yaml.safe_load((REPO / "configs" / "data" / f"{dataset}.yaml").read_text())["data"]["init_args"]["template"]
    built = VLMCLI(args=fit[1:], run=False)  # the same parse and build as `vlm fit`, without fitting
    assert built.datamodule.template == built.model.template == data_template, "the model's template is the data's"

    run(fit)
    (fit_dir,) = versions(flow.runs)
    (ckpt,) = sorted((fit_dir / "checkpoints").glob("epoch=*.ckpt"))  # and last.ckpt (save_last)
    assert yaml.safe_load((fit_dir / "config_fit.yaml").read_text())["data"]["init_args"]["template"] == data_template

    run(resolve(test, ckpt))
    tested = results(versions(flow.runs)[-1])
    assert set(tested["metrics"]) == {"test/acc_base", "test/acc_new", "test/hm"}
    assert tested["dataset"] == dataset and tested["method"] == "coop"
    assert tested["checkpoint"]["ckpt_path"] == str(ckpt)
    assert tested["checkpoint"]["ckpt_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert tested["config"].endswith("config_test.yaml")

    run(resolve(export, ckpt))
    run(test_export)
    again = results(versions(flow.runs)[-1])
    assert again["metrics"] == pytest.approx(tested["metrics"], abs=1e-6), "the export re-evaluates to the same metrics"
    assert again["checkpoint"]["init_from"] == str(flow.export) and again["checkpoint"]["untrained"] is False


def test_image_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    """Data at 64 px into the tiny CLIP (32 px): a ValueError naming both sizes and the key to set,
    not a tensor-shape error inside the image tower."""
    fit = readme_flow("dtd", tmp_path).commands[0]
    with pytest.raises(ValueError, match=r"data gives 64 px images.*backbone 'tiny' takes 32 px.*image_size 32"):
        run([*fit, "--data.init_args.transforms.image_size", "64"])


def test_model_values_disagreeing_with_the_data_are_an_error(tmp_path: Path) -> None:
    """The link would silently replace them; instead both values are named."""
    fit = readme_flow("oxford_pets", tmp_path).commands[0]
    with pytest.raises(LinkedValueError, match=r"model.init_args.template is 'a {}\.'.*a type of pet.*data.init_args.template"):
        run([*fit, "--model.init_args.template", "a {}."])
    with pytest.raises(LinkedValueError, match=r"model.init_args.num_classes is 7, but the data .* gives 3.*Remove model.init_args.num_classes"):
        check_linked_values({"num_classes": 7, "template": None}, SimpleNamespace(num_classes=3, template="a {}."))
