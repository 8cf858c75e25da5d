"""Fixtures: tiny CoOp-style datasets written into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.datamodules.toydata import make_dataset


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    """A complete tiny dataset at tmp_path/toy."""
    return make_dataset(tmp_path / "toy")


@pytest.fixture
def dataset_factory(tmp_path: Path) -> Callable[..., Path]:
    """Build a dataset under tmp_path with custom options."""

    def build(sub: str = "ds", **kwargs: object) -> Path:
        return make_dataset(tmp_path / sub, **kwargs)

    return build
