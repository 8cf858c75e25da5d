"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, arXiv 2502.11494), following its released LLaVA code
(github.com/ZichenWen1/DART: ``get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py`` and the eval scripts' defaults).

The released rule, run once before decoder layer ``K`` (``pruned_layer``, 2) on the outputs of
layer ``K - 1``:

1. pivots by key norm: the layer's keys of each token, all heads concatenated, scored by their L1
   norm ``||k_j||_1 = sum_h ||k_{h,j}||_1``; the ``pivot_image_token`` (4) image tokens and the
   ``pivot_text_token`` (4) tokens after the image (the prompt tail) with the largest norms are the
   pivots;
2. duplication by cosine similarity of the layer's *output hidden states passed through the
   model's final norm* (``self.norm(layer_outputs[0])``): for each pivot in turn, among the image
   tokens that are neither image pivots nor already chosen, the ``TOKEN_TOPK`` tokens *least*
   similar to the pivot (top-k of ``-cos``) are kept and leave the candidate pool;
3. kept: the image pivots and every token chosen in 2 (text pivots only steer the choice).

Mapping to this codebase: the cut after decoder layer ``layer`` runs layers ``layer + 1..`` on the
kept tokens, so ``layer = K - 1`` (default 1). Keys are the probe's post-RoPE keys (the code's
``K_states`` of the layer; with grouped-query attention the L1 norm over the key/value heads ranks
as the norm over the repeated heads does), the states ``LlmProbe.hidden`` / ``text_hidden``, the
prompt tail ``LlmProbe.text_keys`` (the non-visual tokens after the sample's last visual token, up to
the last prompt token: the code's tokens after the image span).

Deliberate departures, for an exact budget and batching:

* budget: the code takes ``TOKEN_TOPK = max_num_trunction // (pivot_image + pivot_text)`` per pivot
  and keeps ``pivot_image + (pivot_image + pivot_text) * TOKEN_TOPK`` tokens (132 for
  ``max_num_trunction = 128``: it overshoots the nominal budget by the image pivots). Here a sample
  keeps exactly ``T = min(num_tokens, count)``: ``min(pivot_image, T)`` image pivots, and the
  remaining ``T - P_img`` tokens split over the ``P`` pivots as evenly as possible (the first
  ``(T - P_img) mod P`` pivots in sequence order take one more; the pool never runs dry, as
  ``T < count``);
* pivot order: the code iterates a Python ``set`` of token indices (hash order); here pivots go in
  sequence order (image pivots, then text pivots);
* the code handles batch size 1 with a fixed image span (``image_token_start_index``); here each
  sample uses its own visual tokens (several images: their union) and prompt tail, any padding;
* norms and similarities in fp32; ties keep the earlier token (``topk`` order is unspecified).

The paper's text (beyond its abstract: "selects a small subset of pivot tokens and then retains the
tokens with low duplication to the pivots") could not be checked against the code here, so no
paper-only variant is exposed; ``pivot_image`` / ``pivot_text`` set the pivot counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.llm_stage import ProbeField
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import register


def top_by(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest ``values [M]``, ties to the earlier index."""
    return torch.sort(-values, stable=True).indices[:count]


@register("dart")
class Dart(LlmTokenPruner):
    """Keep key-norm pivots and the tokens least duplicated with them (module docstring).

    Args:
        num_tokens: visual tokens kept per sample (pivots included).
        layer: decoder layer scored and cut after (DART's ``K - 1``; 1 is K = 2).
        pivot_image: image pivots (largest key L1 norm among the visual tokens).
        pivot_text: text pivots (largest key L1 norm among the prompt tail); 0 for none.
    """

    probe_fields = frozenset({ProbeField.HIDDEN, ProbeField.TEXT})  # the pivots' keys and normed states

    def __init__(self, num_tokens: int = 128, layer: int = 1, pivot_image: int = 4, pivot_text: int = 4) -> None:
        super().__init__(num_tokens, layer)
        if pivot_image < 0 or pivot_text < 0 or pivot_image + pivot_text == 0:
            raise ValueError(f"Dart: pivot_image and pivot_text must be >= 0 with at least one pivot, "
                             f"got {pivot_image} and {pivot_text}.")
        self.pivot_image = int(pivot_image)
        self.pivot_text = int(pivot_text)

    def score(self, probe: LlmProbe) -> Tensor:  # the selection is greedy, not a ranking: see keep()
        raise TypeError("Dart chooses with keep(probe), not with a score.")

    def keep(self, probe: LlmProbe) -> Tensor:
        if probe.hidden is None or probe.text_keys is None or probe.text_hidden is None or probe.text_counts is None:
            raise ValueError("Dart needs LlmProbe.hidden, text_keys, text_hidden and text_counts; run it with the "
                             "LLaVA or Qwen runners, whose CutDecoder fills them.")
        counts, text_counts = probe.counts.tolist(), probe.text_counts.tolist()
        out = torch.zeros(probe.keys.shape[0], probe.keys.shape[2], dtype=torch.bool, device=probe.keys.device)
        for b, (n, t) in enumerate(zip(counts, text_counts)):
            out[b, :n] = self.keep_one(probe.keys[b, :, :n].float(), probe.hidden[b, :n].float(),
                                       probe.text_keys[b, :, :t].float(), probe.text_hidden[b, :t].float())
        return out

    def keep_one(self, keys: Tensor, hidden: Tensor, text_keys: Tensor, text_hidden: Tensor) -> Tensor:
        """``[n]`` bool for one sample: ``keys [Hkv, n, d]``, ``hidden [n, D]`` of its visual tokens and
        ``text_keys [Hkv, t, d]``, ``text_hidden [t, D]`` of its prompt tail."""
        n = hidden.shape[0]
        budget = min(self.num_tokens, n)
        kept = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        if budget == n:
            return kept | True
        image = top_by(keys.abs().sum((0, 2)), min(self.pivot_image, budget)).sort().values  # step 1
        text = top_by(text_keys.abs().sum((0, 2)), min(self.pivot_text, text_keys.shape[1])).sort().values
        kept[image] = True
        pivots = torch.cat([hidden[image], text_hidden[text]])
        if budget > len(image) and len(pivots) == 0:
            raise ValueError("Dart: no pivot to compare with (pivot_image=0 and an empty prompt tail).")
        left = budget - len(image)
        for i, pivot in enumerate(pivots):  # step 2, pivots in sequence order
            quota = left // len(pivots) + (1 if i < left % len(pivots) else 0)
            if quota:
                pool = (~kept).nonzero().flatten()  # at least quota tokens: budget < n
                sim = F.cosine_similarity(pivot[None], hidden[pool], dim=-1)
                kept[pool[top_by(-sim, quota)]] = True
        return kept

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pivot_image={self.pivot_image}, pivot_text={self.pivot_text}"
