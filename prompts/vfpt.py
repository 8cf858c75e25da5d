"""VFPT: Visual Fourier Prompt Tuning (Zeng, Yang, Wang, et al., NeurIPS 2024).

VFPT is VPT-Deep whose prompt embeddings are partly replaced by their 2-D Fourier transform
before insertion: for the ``Fourier`` share of the prompt tokens of a layer,

    P_F = Re( FFT_seq( FFT_hidden(P) ) ),

a 1-D FFT over the hidden dimension followed by one over the token (sequence) dimension, keeping
the real part; the other tokens are inserted as plain VPT prompts. Everything else (insertion
after the CLS/register prefix, replacement at every layer, prompt dropout before the transform,
the init bound) is VPT-Deep (:mod:`vlm.prompts.vpt`).

Explicit choices (the paper leaves them to the code): the Fourier tokens come *first* in the
prompt block, and dropout is applied to the raw prompts before the transform (as TCPA's released
VFPT code does).

:func:`fourier_prompts` is shared with TCPA, whose released code is VFPT+TCPA and transforms
the whole concatenated CLS+image prompt block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlm.prompts.registry import register
from vlm.prompts.vpt import VPT


def fourier_prompts(p: Tensor, fraction: float = 1.0) -> Tensor:
    """``Re(FFT_seq(FFT_hidden(P)))`` on the first ``round(fraction * S)`` tokens of ``p [..., S, D]``.

    The transform runs in float32 (FFTs of half precision need power-of-two sizes on CUDA) and the
    result is cast back to ``p``'s dtype. ``fraction=0`` returns ``p`` unchanged.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fourier fraction must be in [0, 1]; got {fraction}.")
    n = int(round(fraction * p.shape[-2]))
    if n == 0:
        return p
    head = p[..., :n, :].float()
    head = torch.fft.fft(torch.fft.fft(head, dim=-1), dim=-2).real.to(p.dtype)
    return torch.cat([head, p[..., n:, :]], dim=-2) if n < p.shape[-2] else head


@register("vfpt")
class VFPT(VPT):
    """VPT-Deep with Fourier-transformed prompts.

    Args:
        num_tokens: prompt tokens per layer.
        fourier_fraction: share of each layer's prompt tokens that are Fourier prompts (VFPT's
            "Fourier percentage"; 1.0 transforms them all).
        dropout: prompt dropout, applied before the transform.
        deep: fresh prompts at every layer (VFPT is deep; shallow is allowed for ablations).
    """

    def __init__(self, num_tokens: int = 10, fourier_fraction: float = 0.5, dropout: float = 0.0, deep: bool = True) -> None:
        super().__init__(num_tokens=num_tokens, deep=deep, dropout=dropout)
        if not 0.0 <= fourier_fraction <= 1.0:
            raise ValueError(f"VFPT fourier_fraction must be in [0, 1]; got {fourier_fraction}.")
        self.fourier_fraction = fourier_fraction

    def _prompts(self, p: Tensor, batch: int) -> Tensor:
        return fourier_prompts(super()._prompts(p, batch), self.fourier_fraction)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fourier_fraction={self.fourier_fraction}"
