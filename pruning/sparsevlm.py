"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025, arXiv 2410.04417), following its released code (github.com/Gumpest/SparseVLMs:
``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``;
``score.py``, ``attn_postprocess_topk`` and the ``sparse_token_dict`` table; ``utils.py``,
``cluster_and_merge``), version "1_0" (the default ``USE_VERSION``).

Steps, for one sample with visual tokens V (N0 of them) and prompt tail T (every token after the
last visual token up to the last prompt token):

1. text raters, once, from the language model's *input embeddings* ``E``:
   ``m_t = (1/N0) sum_v softmax_t(E_v . E_t)`` (softmax over the prompt tail, no scaling), and the
   raters are ``R = {t : m_t > mean_t m_t}``;
2. at each pruning layer ``l`` (released: 2, 6, 15, 0-based; the layer's *own* attention, computed
   on its full input before the cut), with ``A_h`` the layer's softmax attention over each rater
   row's whole causal row: ``s_j = (1/|R|) sum_{r in R} (1/H) sum_h A_h[r, j]`` for the current
   visual tokens j;
3. keep the ``min(K_l, n - 1)`` best-scored visual tokens (n: the current visual count, K_l: the
   released table), in sequence order; text tokens are always kept; the layers after ``l`` run on the
   shorter sequence;
4. recycling (on by default, as in the code): of the ``d`` deleted tokens the ``m = int(0.3 d) + 1``
   best-scored are clustered on the layer's output states by DPC-KNN into ``c = int(m / 10) + 1``
   clusters (:func:`cluster_assign`), and each cluster's members are averaged,
   ``sum / (size + 1e-6)``; the ``c`` merged tokens are inserted right after the kept visual block
   (before the text after the image), count as visual tokens for the next cut (whose ``n``
   includes them), and the position ids are renumbered ``0..L'-1``. The runner does the insertion
   (``LlmStage.merge_stage``); under its ``original`` policy a merged token takes the positions of
   the visual token it follows.

Released keep counts ``K`` at layers 2, 6, 15 (``sparse_token_dict``, version 1_0): 192 →
(300, 200, 110), 128 → (303, 110, 36), 96 → (238, 48, 26), 64 → (66, 30, 17). ``num_tokens``
picks the row; any other ``num_tokens`` is refused unless ``counts`` gives the per-cut keep counts
explicitly (no interpolation: the released rows are hand-tuned, not a formula of the budget; e.g. 128 keeps
more at layer 2 than 192 does). The final visual count is ``K_last`` plus the last cut's merged
tokens (e.g. 110 + 3 for 192 on LLaVA-1.5's 576).

Mapping: ``layers`` are the cut layers (0-based, scored with their own attention:
``score_next = False``); ``num_tokens`` picks the released row; ``counts`` overrides it.

What the released code does that the paper does not say:

* the number of tokens kept per layer is a fixed table per budget (above), not the paper's
  rank-based adaptive count, and always at most ``n - 1`` (``topk(min(K, n - 1))``); the paper's
  rule is the ``adaptive=lambda`` flag: delete ``min(n - 1, int(lambda * (n - rank(P))))`` with
  ``P`` the raters x visual head-mean attention (the paper's rank-based sparsification level,
  Sec. 3.3; the code never computes a rank);
* raters are chosen once, from the input embeddings (before layer 0, no scaling), over *every*
  token after the image (question and chat-template suffix), with a strict ``>`` mean threshold,
  and reused at every pruning layer;
* scores are the layer's own full-row softmax (system, image and text keys), averaged over heads
  before the rater average; the pruning layer itself still runs on every token (the cut is after
  it, so its KV cache keeps them all);
* recycling's ``0.3`` (``recycle_ratio``), the ``int(m / 10) + 1`` cluster count, the k = c
  neighbours of the density, the ``+ 1e-6`` in the average, and the insertion place are code
  details; merged tokens are re-scored, re-cut and re-merged at later layers like any visual token.

Deviations here: the code adds ``1e-6 * rand`` to the densities (random tie-breaking); here there is
no noise (deterministic; ties keep the earlier token). Scores stay fp32 (the code's attention is in
the model dtype). Batches of any size and either padding, several images per sample (their union
of visual tokens; merged tokens go after the last one); the code handles batch 1 with one image.
Version "2_0" of the repo (SparseVLM+: attention "gravity" correction, head selection, no merge,
kept position ids) is not implemented.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from vlm.llm_stage import ProbeField
from vlm.pruning.llm import LlmProbe, LlmTokenPruner
from vlm.pruning.registry import register

RELEASED_LAYERS = (2, 6, 15)
RELEASED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


def cluster_assign(x: Tensor, clusters: int) -> Tensor:
    """``[m]`` long: the cluster (0..clusters-1, in the centres' order) of each row of ``x [m, C]``,
    by the released DPC-KNN (``cluster_and_merge``): distances ``|x_i - x_j| / sqrt(C)``; density
    ``exp(-mean of the squared distances to the `clusters` nearest rows, itself included)``; each
    row's distance to its nearest denser row (the largest distance where there is none); centres:
    the ``clusters`` largest ``distance * density``; every row joins its nearest centre, a centre
    itself. No random noise on the densities (the code adds ``1e-6 * rand`` to break ties).

    The distances come from Gram products in float64, ``|x_i|^2 + |x_j|^2 - 2 x_i . x_j`` (the
    code's pairwise differences materialise ``[m, m, C]``: ~30x slower at 150 rows of 512, and a
    tenth of SparseVLM's whole cut time at the 64 budget); float64 keeps them within float32
    rounding of the differences' norms."""
    y = x.double()
    sq = (y * y).sum(-1)
    dist = (sq[:, None] + sq[None] - 2.0 * (y @ y.T)).clamp_(min=0.0).sqrt_()
    dist.fill_diagonal_(0.0)
    dist = dist / x.shape[1] ** 0.5
    near = torch.topk(dist, clusters, dim=-1, largest=False).values
    density = (-(near**2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    parent = torch.where(denser, dist, dist.max()).min(-1).values
    centres = torch.sort(-(parent * density), stable=True).indices[:clusters]
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign


def select_raters(embeds: Tensor, counts: Tensor, text_embeds: Tensor, text_counts: Tensor) -> Tensor:
    """``[B, T]`` bool, step 1: the prompt-tail tokens whose mean (over the sample's visual tokens)
    softmax relevance ``softmax_t(E_v . E_t)`` exceeds its mean over the tail."""
    v, t = embeds.float(), text_embeds.float()
    vis_valid = torch.arange(v.shape[1], device=v.device)[None] < counts[:, None]
    txt_valid = torch.arange(t.shape[1], device=t.device)[None] < text_counts[:, None]
    logits = torch.einsum("bnd,btd->bnt", v, t).masked_fill(~txt_valid[:, None], float("-inf"))
    rel = logits.softmax(-1).masked_fill(~vis_valid[..., None], 0.0).sum(1) / counts.clamp(min=1)[:, None].float()
    mean = rel.masked_fill(~txt_valid, 0.0).sum(1) / text_counts.clamp(min=1).float()
    return txt_valid & (rel > mean[:, None])


@register("sparsevlm")
class SparseVLM(LlmTokenPruner):
    """Text-rater-guided visual-token cuts at several LLM layers (module docstring).

    Args:
        num_tokens: the released budget (192, 128, 96 or 64) whose keep-count row is used; with
            ``counts`` it is only a label.
        layers: the decoder layers (0-based) after which the cuts run, each scored with its own
            attention. Released: (2, 6, 15).
        counts: per-cut keep counts (one per layer), overriding the released table.
        recycle: the released token recycling (step 4; on in the code); False: deletion only.
        recycle_ratio: the share of the deleted tokens that are recycled (released 0.3).
        adaptive: the paper's rank rule with this lambda instead of the keep-count table (None: the code).
    """

    #: the raters (input embeddings), their rows' attention weights, and the states recycling merges
    probe_fields = frozenset({ProbeField.TEXT_ROWS, ProbeField.EMBEDS, ProbeField.STATES})

    def __init__(self, num_tokens: int = 192, layers: Sequence[int] = RELEASED_LAYERS,
                 counts: Optional[Sequence[int]] = None, recycle: bool = True, recycle_ratio: float = 0.3,
                 adaptive: Optional[float] = None) -> None:
        layers = tuple(int(x) for x in layers)
        if not layers or layers[0] < 0 or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"SparseVLM: layers must be strictly increasing and >= 0, got {list(layers)}.")
        if not 0 <= recycle_ratio < 1:
            raise ValueError(f"SparseVLM: recycle_ratio must be in [0, 1), got {recycle_ratio}.")
        if adaptive is not None and not adaptive > 0:
            raise ValueError(f"SparseVLM: adaptive (the paper's lambda) must be > 0, got {adaptive}.")
        if counts is None and adaptive is not None:
            counts = (0,) * len(layers)  # unused: the paper's rank rule sets the counts
        elif counts is None:
            if int(num_tokens) not in RELEASED_COUNTS:
                raise ValueError(f"SparseVLM: no released keep counts for num_tokens={num_tokens} (released: "
                                 f"{sorted(RELEASED_COUNTS)}); pass counts=(...) explicitly, one per layer.")
            if layers != RELEASED_LAYERS:
                raise ValueError(f"SparseVLM: the released keep counts are for layers {list(RELEASED_LAYERS)}; with "
                                 f"layers {list(layers)} pass counts=(...) explicitly.")
            counts = RELEASED_COUNTS[int(num_tokens)]
        counts = tuple(int(c) for c in counts)
        if len(counts) != len(layers) or (adaptive is None and any(c < 1 for c in counts)):
            raise ValueError(f"SparseVLM: counts must be one positive count per layer, got {list(counts)} for "
                             f"layers {list(layers)}.")
        super().__init__(int(num_tokens), layers[0])
        self.layers = layers
        self.counts = counts
        self.recycle = bool(recycle)
        self.recycle_ratio = float(recycle_ratio)
        self.adaptive = None if adaptive is None else float(adaptive)
        #: (probe, its scores) between a cut's keep_stage and merge_stage (score()); cleared by merge_stage
        self._scored: Optional[tuple[LlmProbe, Tensor]] = None
        #: (the pass's visual input embeddings, its raters): the raters depend only on the input
        #: embeddings of the visual tokens and of the prompt tail, which no cut changes (merged tokens go
        #: before the tail), so the cuts of one pass share them (raters()); cleared after the last cut
        self._raters: Optional[tuple[Tensor, Tensor]] = None

    def cuts(self) -> tuple[int, ...]:
        return self.layers

    def raters(self, probe: LlmProbe) -> Tensor:
        """``[B, T]`` bool: the text raters among the prompt tail (step 1)."""
        if probe.embeds is None or probe.text_embeds is None or probe.text_counts is None:
            raise ValueError("SparseVLM needs LlmProbe.embeds / text_embeds (input embeddings); run it with the "
                             "LLaVA or Qwen runners, whose CutDecoder fills them.")
        if self._raters is not None and self._raters[0] is probe.embeds:  # a later cut of the same pass
            return self._raters[1]
        initial = probe.counts if probe.initial_counts is None else probe.initial_counts
        raters = select_raters(probe.embeds, initial, probe.text_embeds, probe.text_counts)
        self._raters = (probe.embeds, raters)
        return raters

    def rater_weights(self, probe: LlmProbe) -> tuple[Tensor, Tensor]:
        """``[B, T, N]`` head-mean attention of each prompt-tail row on the visual tokens, and the
        ``[B, T]`` raters (steps 1-2)."""
        return probe.text_row_weights("SparseVLM").mean(1), self.raters(probe)

    def score(self, probe: LlmProbe) -> Tensor:
        """Step 2: head-mean attention of the raters' rows on each visual token, averaged over raters.
        Computed once per probe: the cut (``keep_stage``) and recycling (``merge_stage``) share it."""
        if self._scored is not None and self._scored[0] is probe:
            return self._scored[1]
        weights, raters = self.rater_weights(probe)
        picked = weights.masked_fill(~raters[..., None], 0.0).sum(1)
        scores = picked / raters.sum(1).clamp(min=1)[:, None].float()
        self._scored = (probe, scores)
        return scores

    def budget(self, probe: LlmProbe, stage: int) -> Tensor:
        """``[B]``: ``min(counts[stage], n - 1)`` visual tokens kept of the current ``n`` (the code); with
        ``adaptive`` (the paper), ``n - min(n - 1, int(adaptive * (n - rank(P))))``."""
        if self.adaptive is None:
            return (probe.counts - 1).clamp(min=0).clamp(max=self.counts[stage])
        weights, raters = self.rater_weights(probe)
        out = []
        for b in range(len(probe.counts)):
            n = int(probe.counts[b])
            if n == 0:
                out.append(0)
                continue
            p = weights[b][raters[b]][:, :n]
            rank = int(torch.linalg.matrix_rank(p)) if p.numel() else 0
            out.append(n - min(n - 1, int(self.adaptive * (n - rank))))
        return torch.tensor(out, device=probe.counts.device)

    def keep_stage(self, probe: LlmProbe, stage: int) -> Tensor:
        return self.keep_best(probe, self.budget(probe, stage))

    def keep(self, probe: LlmProbe) -> Tensor:
        return self.keep_stage(probe, 0)

    def merge_stage(self, probe: LlmProbe, stage: int, keep: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Recycling (module docstring): of the sample's deleted tokens, the ``int(0.3 * deleted) + 1``
        best-scored are clustered into ``int(m / 10) + 1`` groups (:func:`cluster_assign`, on the
        layer's output states) and each group becomes one token, ``sum / (size + 1e-6)`` as the code
        averages. Returns the runner's ``(weights [B, M, N], counts [B])``, or None without recycling."""
        try:
            return self.recycled(probe, keep)
        finally:
            self._scored = None  # the cut is done: hold no tensors of it
            if stage == len(self.layers) - 1:
                self._raters = None  # and the pass is done

    def recycled(self, probe: LlmProbe, keep: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """:meth:`merge_stage`'s weights and counts (None without recycling)."""
        if not self.recycle:
            return None
        if probe.states is None:
            raise ValueError("SparseVLM recycling needs LlmProbe.states (the layer's output states); run it with "
                             "the LLaVA or Qwen runners, whose CutDecoder fills them.")
        valid = probe.valid
        deleted = valid & ~keep
        scores = self.score(probe).float()
        b, n = deleted.shape
        plans = []
        for i in range(b):
            idx = deleted[i].nonzero().flatten()
            if idx.numel() == 0:
                plans.append(None)
                continue
            m = int(idx.numel() * self.recycle_ratio) + 1
            top = idx[torch.sort(-scores[i, idx], stable=True).indices[:m]]
            clusters = int(m / 10) + 1
            plans.append((top, cluster_assign(probe.states[i, top], clusters), clusters))
        counts = torch.tensor([0 if p is None else p[2] for p in plans], device=keep.device)
        weights = torch.zeros(b, max(1, int(counts.max())), n, device=keep.device)
        for i, plan in enumerate(plans):
            if plan is None:
                continue
            top, assign, clusters = plan
            sizes = torch.bincount(assign, minlength=clusters).float()
            weights[i, assign, top] = 1.0 / (sizes[assign] + 1e-6)
        return weights, counts

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={list(self.layers)}, counts={list(self.counts)}, recycle={self.recycle}, adaptive={self.adaptive}"
