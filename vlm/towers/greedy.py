"""Greedy decoding shared by the LLaVA and Qwen runners: the token loop, its stop rule and timing.

A runner prefills (its own inputs, positions and cache), then hands :func:`greedy_tokens` the
first logits and a ``step`` that feeds one token per sample and returns the next logits; how a
step places positions and masks (1-D, 3-D M-RoPE, the LLM-stage cut's layer groups) is the
runner's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor


@dataclass
class Generation:
    """Greedy output ``tokens [B, T]`` (``pad_token_id`` after EOS), the LLM inputs (with the
    LLM-stage cut's layout in ``inputs.cut`` when one ran), and wall times of the vision+prefill
    step and of the decode steps (seconds)."""

    tokens: Tensor
    inputs: Any
    prefill_s: float
    decode_s: float


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so wall times measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_tokens(
    first_logits: Tensor,
    step: Callable[[Tensor], Tensor],
    max_new_tokens: int,
    eos_token_id: Optional[int],
    pad_token_id: int,
) -> Tensor:
    """``[B, T]`` greedy tokens: the argmax of ``first_logits [B, V]``, then of ``step(tokens [B])``
    for each next token. A sample that produced ``eos_token_id`` gets ``pad_token_id`` after it;
    the loop stops when every sample has, or after ``max_new_tokens``."""
    nxt = first_logits.argmax(-1)
    out = [nxt]
    done = torch.zeros_like(nxt, dtype=torch.bool) if eos_token_id is None else nxt == eos_token_id
    while len(out) < max_new_tokens and not bool(done.all()):  # sync: the stop rule reads the tokens
        nxt = step(nxt).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out.append(nxt)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
    return torch.stack(out, 1)
