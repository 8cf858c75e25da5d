"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764),
following its released code (github.com/pkunlp-icler/FastV: the modified LLaMA decoder forward,
``fastv_k`` / ``fastv_r``, and the in-place token-drop variant ``fast_v_inplace``).

The released rule: after decoder layer ``K`` (``fastv_k``, 2 by default in the paper's tables) the
decoder keeps its text tokens and the image tokens that received the most attention *from the last
prompt token* at layer ``K - 1``. With the layer's post-RoPE query ``q_{h,p}`` of the last token p,
the keys ``k_{h,j}`` of every token j of p's causal row (system, image and text tokens), the logit
scale s and H heads:

    a_{h,j} = exp(s q_{h,p} . k_{h,j}) / sum_{i <= p} exp(s q_{h,p} . k_{h,i})      (1) the layer's attention
    r_j     = (1/H) sum_h a_{h,j},        j an image token                          (2) head mean
    keep the top ``round(N (1 - fastv_r))`` image tokens by r                       (3)

The softmax in (1) runs over *all* keys of the row, as the model's own attention does (the code
reads the eager attention weights of layer ``K - 1``); the head mean in (2) is therefore *not*
rank-equivalent to a head mean of softmaxes over the image keys only (each head has its own
normaliser). Here (1) comes from the probe row alone: ``exp(s q . k_j - query_lse_h)`` with the
runner's per-head log-sum-exp over the probe's causal row (``LlmProbe.query_lse``), so the model
keeps its fused attention.

Mapping to this codebase: the cut after decoder layer ``layer`` runs layers ``layer + 1..`` on the
kept tokens, so ``layer = K - 1`` (default 1, i.e. FastV's K = 2) and the scores are that layer's.
``num_tokens`` is the keep count of (3) (``round(576 * (1 - R))`` for LLaVA-1.5's 576 image tokens:
R = 50% keeps 288, R = 75% keeps 144); it applies per sample, ``min(num_tokens, count)``.

What the released code does that the paper does not say:

* the score row is the *last prompt token*'s, not an average over all query tokens (the paper's
  text describes the average attention each image token receives); the probe carries one query row
  per sample, so the all-queries variant is not offered here (it would need every query of the
  prompt, i.e. the attention matrix this runner avoids);
* after the cut the kept tokens keep their original position ids (``position_ids = keep_indexs``);
  set the backbone's ``position_policy="original"`` for that (LLaVA's default, ``compact``,
  renumbers);
* its batch handling uses sample 0's scores for the whole batch (``[0]``) and a fixed image span
  (``image_token_start_index``, ``image_token_length``); here each sample uses its own scores and
  visual tokens (several images: their union), with either padding;
* scores are computed in fp32 here (the code uses the model's dtype); ties keep the earlier token.
"""

from __future__ import annotations

from torch import Tensor

from vlm.llm_stage import ProbeField
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import register


@register("fastv")
class FastV(LlmTokenPruner):
    """Keep the visual tokens the last prompt token attends to most at decoder layer ``layer``
    (the full-row softmax of that layer, averaged over heads; see the module docstring).

    Args:
        num_tokens: visual tokens kept per sample (FastV's ``round(N (1 - R))``).
        layer: decoder layer scored and cut after (FastV's ``K - 1``; 1 is K = 2).
    """

    probe_fields = frozenset({ProbeField.QUERY_LSE})  # the row weights

    def __init__(self, num_tokens: int = 288, layer: int = 1) -> None:
        super().__init__(num_tokens, layer)

    def score(self, probe: LlmProbe) -> Tensor:
        return probe.row_weights("FastV").mean(1)  # (1) [B, H, N], then (2)
