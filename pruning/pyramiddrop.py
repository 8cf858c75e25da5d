"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247), following its released code
(github.com/Cooperx521/PyramidDrop: ``llava/model/modeling_llama_pdrop.py``, ``pdrop_forward`` and
``pdrop_rank_drop``; the eval scripts' ``--layer_list '[8,16,24]' --image_token_ratio_list
"[0.5,0.25,0.125]"``, to which ``model_vqa_loader.py`` prepends 1.0).

The language model is split into stages at the layers of ``layer_list`` (8, 16, 24 of LLaVA-1.5's
32); stage s (0-based) holds ``int(N * ratio_s)`` of the sample's N image tokens, ratios
1, 0.5, 0.25, 0.125. At the boundary before layer ``l`` of ``layer_list`` (after decoder layer
``l - 1``), with ``h`` layer ``l - 1``'s output, p the last instruction token (the last prompt
token), ``Norm_l``, ``W^q_l``, ``W^k_l`` *layer l's* input norm and projections, ``R`` RoPE at the
current position ids and H heads of size d:

    q_h = R(W^q_l Norm_l(h_p)),   k_{h,j} = R(W^k_l Norm_l(h_j))                       (1) re-projection
    a_{h,j} = softmax_j(q_h . k_{h,j} / sqrt(d)) over every key j <= p of the row       (2) full causal row
    r_j = (1/H) sum_h a_{h,j},   j an image token of the current sequence               (3) head mean
    keep the top ``int(N * ratio_{s+1})`` image tokens by r, in sequence order          (4)

and layers ``l..`` run on the text tokens and the kept image tokens.

Mapping to this codebase: a cut "after decoder layer k" scored with layer ``k + 1``'s projections
(``LlmStage.score_next``), so ``layers=(8, 16, 24)`` (official numbering: the first layer of each
new stage) are the cuts after layers 7, 15, 23; ``layer`` (the first cut) is 7. The runner scores
cut ``i`` with :meth:`keep_stage`. ``N`` is each sample's visual-token count when it enters the
language model (``LlmProbe.initial_counts``: the union of its images' tokens, layout tokens such as
kept ``image_newline`` excluded); the counts are floored from N at every stage as the code does,
not from the previous stage's count.

Budget (``num_tokens``): the paper reports a method's budget as the average number of image tokens
over the decoder layers. ``num_tokens`` is that average for ``reference_tokens`` (576, LLaVA-1.5)
image tokens on a ``num_layers`` (32) layer model: with the released ``layers`` and ``ratios`` it is
(8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32 = 270 (``num_tokens=None`` derives it). Given
``num_tokens`` (and no ``ratios``), the ratios become ``(λ, λ², λ³, ...)`` with λ solved so the
average equals ``num_tokens`` (the floors make it exact to within a token per stage). The released
layers keep 576 tokens for 8 layers, so they reach 192 (``num_tokens=192``) but not 128 or 64: for
those budgets pass an earlier first stage (``layers``), or the paper's own schedule as ``layers`` +
``ratios`` (``num_tokens`` is then derived and must not be given), which reproduces it exactly.

What the released code does that the paper does not say:

* the ranking uses the projections of the *first layer of the next stage* (``self.layers[rank_layer]``
  with ``rank_layer = layer_idx + 1``), applied to the current layer's output, not the attention of
  the stage's last layer; ``score_with="current"`` scores with the last layer of the ending stage
  instead (its own attention inputs: the paper's "attention at the end of the stage" reading);
* the softmax of (2) runs over the whole causal row (system, image and instruction tokens, padding
  masked), then the image columns are taken: not a softmax over the image keys only;
* the query is one row, the last instruction token (at inference; training uses every token before
  an answer); kept counts are ``int(N * ratio)`` of the *original* count; kept tokens keep their
  sequence order (``topk(...).indices.sort()``);
* after each drop the position ids are renumbered 0..L'-1 (``torch.arange``), and decoding shifts
  them by the dropped counts: the runner's ``compact`` policy (LLaVA's default);
* it supports right padding and one image span per sample; here each sample uses its own scores and
  visual tokens (several images: their union), with either padding, LLaVA and Qwen runners;
* the code casts the softmax back to the model dtype before the head mean; here scores stay fp32
  (``query_lse`` from the runner), and ties keep the earlier token.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from vlm.llm_stage import ProbeField
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import register

SCORE_WITH = ("next", "current")
RELEASED_RATIOS = (0.5, 0.25, 0.125)


def average_tokens(layers: Sequence[int], ratios: Sequence[float], num_layers: int, tokens: int) -> float:
    """Average image tokens over ``num_layers`` decoder layers: ``tokens`` before ``layers[0]``, then
    ``int(tokens * ratios[s])`` from ``layers[s]`` on (official layer numbering)."""
    bounds = [0, *layers, num_layers]
    counts = [tokens] + [int(tokens * r) for r in ratios]
    return sum(c * (b - a) for c, a, b in zip(counts, bounds, bounds[1:])) / num_layers


def geometric_ratios(num_tokens: int, layers: Sequence[int], num_layers: int, tokens: int) -> tuple[float, ...]:
    """Ratios ``(λ, λ², ...)`` whose layer-average (continuous, no floors) is ``num_tokens``."""
    bounds = [0, *layers, num_layers]
    spans = [b - a for a, b in zip(bounds, bounds[1:])]

    def avg(lam: float) -> float:
        return tokens * sum(s * lam**i for i, s in enumerate(spans)) / num_layers

    if not avg(0.0) <= num_tokens <= tokens:
        raise ValueError(
            f"PyramidDrop: num_tokens={num_tokens} cannot be a layer-average with layers {list(layers)} of "
            f"{num_layers} ({avg(0.0):.0f} is kept before the first cut, {tokens} is everything); move the "
            f"first layer earlier or pass ratios."
        )
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < num_tokens else (lo, mid)
    lam = (lo + hi) / 2
    return tuple(lam ** (i + 1) for i in range(len(layers)))


@register("pyramiddrop")
class PyramidDrop(LlmTokenPruner):
    """Drop visual tokens in stages inside the language model (module docstring).

    Args:
        num_tokens: the layer-average image-token budget for ``reference_tokens`` on ``num_layers``
            layers; None derives it from ``ratios`` (270 with the released schedule). Given with
            ``ratios=None``, the ratios are solved geometrically.
        layers: official ``layer_list``: the first decoder layer (0-based) of each new stage; the
            cuts run after ``layers[i] - 1``. Released: (8, 16, 24).
        ratios: official ``image_token_ratio_list`` (without the leading 1.0): the fraction of the
            entering visual tokens each new stage keeps; None: the released (0.5, 0.25, 0.125), or
            solved from ``num_tokens`` when that is given.
        score_with: ``"next"`` (the code: the new stage's first layer's projections) or
            ``"current"`` (the ending stage's last layer's attention inputs).
        num_layers, reference_tokens: the model and visual-token count ``num_tokens`` refers to
            (LLaVA-1.5: 32 layers, 576 tokens); only the budget bookkeeping uses them.
    """

    probe_fields = frozenset({ProbeField.QUERY_LSE})  # the row weights

    def __init__(
        self,
        num_tokens: Optional[int] = None,
        layers: Sequence[int] = (8, 16, 24),
        ratios: Optional[Sequence[float]] = None,
        score_with: str = "next",
        num_layers: int = 32,
        reference_tokens: int = 576,
    ) -> None:
        layers = tuple(int(x) for x in layers)
        if not layers or layers[0] < 1 or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"PyramidDrop: layers must be strictly increasing and >= 1 (the first layer of each "
                             f"new stage), got {list(layers)}.")
        if score_with not in SCORE_WITH:
            raise ValueError(f"PyramidDrop: score_with must be one of {SCORE_WITH}, got {score_with!r}.")
        if ratios is None:  # the released schedule, or one solved for a layer-average budget
            ratios = RELEASED_RATIOS if num_tokens is None else geometric_ratios(
                int(num_tokens), layers, num_layers, reference_tokens)
        elif num_tokens is not None:
            raise ValueError("PyramidDrop: give either ratios or num_tokens (a layer-average budget), not both.")
        ratios = tuple(float(r) for r in ratios)
        if len(ratios) != len(layers) or any(not 0 < r <= 1 for r in ratios) or any(
                a < b for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"PyramidDrop: ratios must be one per layer, in (0, 1] and non-increasing, got "
                             f"{list(ratios)} for layers {list(layers)}.")
        if num_tokens is None:
            num_tokens = max(1, round(average_tokens(layers, ratios, num_layers, reference_tokens)))
        super().__init__(int(num_tokens), layers[0] - 1)
        self.layers = layers
        self.ratios = ratios
        self.score_with = score_with
        self.score_next = score_with == "next"

    def cuts(self) -> tuple[int, ...]:
        return tuple(x - 1 for x in self.layers)

    def score(self, probe: LlmProbe) -> Tensor:
        """(2)-(3): the full-row softmax weights of the visual keys, averaged over heads."""
        return probe.row_weights("PyramidDrop").mean(1)

    def budget(self, probe: LlmProbe, stage: int) -> Tensor:
        """``[B]`` visual tokens kept at cut ``stage``: ``int(N * ratios[stage])`` of the entering count."""
        initial = probe.counts if probe.initial_counts is None else probe.initial_counts
        kept = torch.floor(initial.double() * self.ratios[stage]).long()
        return torch.minimum(kept, probe.counts)

    def keep_stage(self, probe: LlmProbe, stage: int) -> Tensor:
        return self.keep_best(probe, self.budget(probe, stage))

    def keep(self, probe: LlmProbe) -> Tensor:
        return self.keep_stage(probe, 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={list(self.layers)}, ratios={list(self.ratios)}, score_with={self.score_with!r}"
