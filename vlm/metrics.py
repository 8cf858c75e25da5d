"""The summary statistics every report of the papers uses, defined once.

* :func:`harmonic_mean`: the base-to-novel HM of the CLIP prompt-learning protocol,
  ``2 b n / (b + n)`` (0 when both are 0).
* :func:`mean_ci95`: mean and 95 % interval half-width ``1.96 * std / sqrt(n)`` with the sample
  standard deviation (ddof 1), as Dassl's ``parse_test_res`` reports seeds and the few-shot papers
  report episodes; the half-width is 0 for a single value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``, 0 when ``a + b`` is 0."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def mean_ci95(values: Union[Sequence[float], torch.Tensor]) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))`` with the sample std (ddof 1); 0 half-width for one value."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("mean_ci95 needs at least one value.")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), 1.96 * std / math.sqrt(arr.size)
