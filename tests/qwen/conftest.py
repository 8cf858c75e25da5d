"""Fixtures of the Qwen tests: each test runs on both tiny models (``kind``)."""

from __future__ import annotations

import pytest

from tests.qwen.tiny import tiny_model


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return tiny_model(kind)
