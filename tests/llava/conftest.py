"""Fixtures shared by the LLaVA-1.5 runner tests: the tiny model and a ragged three-sample batch
(3, 2 and 1 text tokens before the image, 3, 6 and 1 after). A test module may define its own."""

from __future__ import annotations

import pytest
import torch

from tests.llava.tiny import prompt, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    seqs = [prompt([1, 7, 8], [9, 10, 11], 16), prompt([1, 12], [13, 14, 15, 16, 17, 18], 16), prompt([1], [19], 16)]
    return seqs, torch.randn(3, 3, 32, 32)
