"""FlowCut's LLM stage (Tong et al., NeurIPS 2025, arXiv 2505.19536), the second cut of its anyres
(LLaVA-NeXT) recipe: the vision stage keeps ``T / 2`` patches of every crop, then after decoder
layer 1 each sample's visual tokens are cut to ``T`` with text-conditioned scores.

With the probe token p = the last prompt token, the visual tokens j of the sample, and the
post-RoPE queries/keys and the values of the scored layer (per head h, head size d):

    r_j = (1/H) sum_h softmax_j(q_{h,p} . k_{h,j} / sqrt(d))        relation: text-to-visual attention
    m_j = (1/H) sum_h softmax_j(v_{h,p} . v_{h,j} / sqrt(d))        semantic: value similarity
    n_j = || (1/H) sum_h v_{h,j} ||_1                               information density
    S_j = (r_j / sum_i r_i + m_j / sum_i m_i) * n_j

(softmaxes over the sample's visual tokens only); keep the top ``T`` by S, in sequence order.

Documented choices:

* the visual span is every visual token of the sample, ``image_newline`` tokens included (they
  compete like patches, and ``T`` counts them); with several images the span is their union;
* with grouped-query attention the semantic and density means run over the key/value heads, which
  equals the official mean over the repeated heads;
* softmaxes and scores are computed in fp32 (the official code casts the softmax back to fp16);
* ties keep the earlier token; a sample with at most ``T`` visual tokens keeps them all.

Official-code behaviours not reproduced: its flash-attention path is only right for batch size 1
(q/k/v transposed inside the per-sample loop) and left padding raises, while here any batch with
either padding works and a sample never depends on its neighbours; and its multi-crop packing drops
LLaVA-NeXT's ``image_newline`` tokens, while ours keeps LLaVA-NeXT's native layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlm.pruning.flowcut import FlowCut
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import register


@register("flowcut_llm")
class FlowCutLlm(LlmTokenPruner):
    """FlowCut's text-conditioned cut inside the LLM, optionally after its vision stage.

    Args:
        num_tokens: visual tokens kept per sample after the cut (T; 640/320/160 for LLaVA-NeXT-7B).
        layer: decoder layer scored and cut after (1 in the paper: layers 2.. run on T tokens).
        crop_tokens: patches per crop kept by FlowCut's vision stage before the LLM (the official
            anyres recipe uses T // 2); None runs the LLM stage alone.
        ema: the vision stage's cumulative-score weight (see :class:`~vlm.pruning.flowcut.FlowCut`).
    """

    def __init__(self, num_tokens: int = 320, layer: int = 1, crop_tokens: Optional[int] = None, ema: float = 0.5) -> None:
        vision = None if crop_tokens is None else FlowCut(num_tokens=crop_tokens, ema=ema)
        super().__init__(num_tokens, layer, vision)

    def score(self, probe: LlmProbe) -> Tensor:
        q, vq = probe.query.float(), probe.query_value.float()
        k, v = probe.keys.float(), probe.values.float()
        b, heads, d = q.shape
        kv_heads = k.shape[1]
        scale = d**-0.5
        off = ~probe.valid[:, None]  # [B, 1, N]
        logits = torch.einsum("bkgd,bknd->bkgn", q.view(b, kv_heads, heads // kv_heads, d), k).flatten(1, 2)
        relation = (logits * scale).masked_fill(off, float("-inf")).softmax(-1).mean(1)
        semantic = (torch.einsum("bkd,bknd->bkn", vq, v) * scale).masked_fill(off, float("-inf")).softmax(-1).mean(1)
        density = v.mean(1).abs().sum(-1)
        tiny = torch.finfo(torch.float32).tiny
        relation = relation / relation.sum(1, keepdim=True).clamp_min(tiny)
        semantic = semantic / semantic.sum(1, keepdim=True).clamp_min(tiny)
        return (relation + semantic) * density
