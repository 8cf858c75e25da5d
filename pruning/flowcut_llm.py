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

The released anyres recipe, which the defaults reproduce (tested against a plain reimplementation
of the official selection, ``tests/llava/official_anyres.py``):

* per-crop budget: the vision stage keeps ``crop_tokens = T // 2`` patches of *every* view, the base
  view included, cut with one prune count per image (the maximum over its crops; see
  :class:`~vlm.pruning.flowcut.FlowCut`, ``shared_count``);
* base view: its ``T // 2`` kept patches come first, in raster order, then the sub-crops' kept
  patches inside the unpad window, row-major over the tiled grid;
* newlines: the official multi-crop packing has no ``image_newline`` tokens, so the LLM span holds
  only patches and all of ``T`` goes to patches (``newlines="drop"``).

Flags for deliberate departures: ``shared_count=False`` cuts each crop by its own count;
``newlines="keep"`` keeps LLaVA-NeXT's native layout (a newline after every grid row that keeps a
patch after the vision stage) with the newlines outside the budget: they are not scored, never cut,
and ``T`` still counts patches only (so a row emptied by the LLM cut keeps its newline).

Qwen2.5-VL / Qwen3-VL (``vlm.towers.qwen``; a recipe of ours, not a released one): one view per
image, so the vision stage keeps ``crop_tokens`` merged tokens (whole 2x2 merge units) of every
image, and the LLM stage cuts each sample's visual tokens (all its images) to ``T``. The kept tokens
keep their 3-D M-RoPE positions (the runner's ``original`` policy, its default), and Qwen3-VL's
DeepStack features after the cut reach the kept visual tokens only.

Documented choices:

* with several images in a sample the span is their union;
* with grouped-query attention the semantic and density means run over the key/value heads, which
  equals the official mean over the repeated heads;
* softmaxes and scores are computed in fp32 (the official code casts the softmax back to fp16);
* ties keep the earlier token; a sample with at most ``T`` visual tokens keeps them all.

Official-code behaviours not reproduced: its flash-attention path is only right for batch size 1
(q/k/v transposed inside the per-sample loop), left padding raises, and its vision-stage prune
count is the maximum over every crop of every image in the batch; here any batch with either
padding works and a sample never depends on its neighbours. Its unpad window rounds with
``int(h * scale)``, ours with transformers' ``int(round(h * scale, 7))`` (they differ only when
``h * scale`` falls within 1e-7 below an integer).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlm.llm_stage import ProbeField
from vlm.pruning.flowcut import FlowCut
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import register


@register("flowcut_llm")
class FlowCutLlm(LlmTokenPruner):
    """FlowCut's text-conditioned cut inside the LLM, after its vision stage by default.

    Args:
        num_tokens: visual tokens kept per sample after the cut (T; 640/320/160 for LLaVA-NeXT-7B).
        layer: decoder layer scored and cut after (1 in the paper: layers 2.. run on T tokens).
        crop_tokens: patches per crop kept by the vision stage; None: ``num_tokens // 2``, the
            official anyres recipe.
        two_stage: run FlowCut's vision stage before the LLM (False: the LLM stage alone).
        ema: the vision stage's cumulative-score weight (see :class:`~vlm.pruning.flowcut.FlowCut`).
        shared_count: the vision stage cuts an image's crops with one prune count (official); False:
            each crop by its own.
        newlines: ``"drop"`` (official: LLaVA-NeXT images packed without ``image_newline``) or
            ``"keep"`` (native layout; newlines outside the budget, see the module docstring).
    """

    probe_fields = frozenset({ProbeField.VALUES})  # the value-value relation

    NEWLINES = ("drop", "keep")

    def __init__(
        self,
        num_tokens: int = 320,
        layer: int = 1,
        crop_tokens: Optional[int] = None,
        two_stage: bool = True,
        ema: float = 0.5,
        shared_count: bool = True,
        newlines: str = "drop",
    ) -> None:
        if newlines not in self.NEWLINES:
            raise ValueError(f"FlowCutLlm: newlines must be one of {self.NEWLINES}, got {newlines!r}.")
        if crop_tokens is None:
            crop_tokens = max(int(num_tokens) // 2, 1)
        vision = FlowCut(num_tokens=crop_tokens, ema=ema, shared_count=shared_count) if two_stage else None
        super().__init__(num_tokens, layer, vision)
        self.newlines = newlines
        self.anyres_newlines = newlines == "keep"

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, newlines={self.newlines!r}"
