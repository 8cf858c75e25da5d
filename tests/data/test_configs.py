"""Every configs/data/*.yaml parses with the CLI (with the ViT-B/16 backbone and default trainer) and names a registered dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm.runtime.cli import main
from vlm.datamodules import available_datasets

REPO = Path(__file__).resolve().parents[2]
DATA_CONFIGS = sorted((REPO / "configs" / "data").glob("*.yaml"))


def test_one_config_per_dataset() -> None:
    assert {p.stem for p in DATA_CONFIGS} == set(available_datasets())


@pytest.mark.parametrize("path", DATA_CONFIGS[::7], ids=lambda p: p.stem)
def test_parses_with_the_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(REPO / "configs/backbone/clip_vit_b16.yaml"), "--config", str(REPO / "configs/trainer/default.yaml"),
            "--config", str(path), "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["dataset"] == path.stem
    assert "{}" in printed["data"]["init_args"]["template"]
