"""DivPrune: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar, Singh, Akbari, Zhang, CVPR 2025, arXiv 2503.02175); official code: github.com/vbdi/divprune
(``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``, ``DivPrune`` and its call at the
end of ``prepare_inputs_labels_for_multimodal``).

Pruning as a Max-Min Diversity Problem, solved greedily. For the ``n`` visual tokens ``f_1..f_n`` of
one image (or crop):

    d(i, j) = 1 - <f_i, f_j> / (||f_i|| ||f_j||)                     (cosine distance, [n, n])
    s_1     = argmax_j  min2_i d(i, j)                                 (min2: the second smallest
                                                                        entry of column j, diagonal
                                                                        included: the nearest other token)
    s_t     = argmax_j  min_{i in {s_1..s_{t-1}}} d(i, j),  t = 2..k    (the farthest from the set)

ties go to the earlier token (``torch.argmax``); the kept tokens stay in sequence (raster) order
(the official code sorts ``keep_indexs``).

What the released code does that the paper does not say, and what runs here:

* **Features.** The code scores the LLM input embeddings, i.e. the *projector outputs* of the
  feature layer's patches (``new_input_embeds[0][35:35 + n]``, after ``mm_projector``). A vision-tower
  hook never sees the projector (hooks hold no backbone, ``vlm.context``), so here the distances are
  taken on the projector's *input*: the tower's hidden state after block ``layer`` (default the last
  block of the pass, which for LLaVA is ``hidden_states[vision_feature_layer]``). LLaVA's projector
  (Linear-GELU-Linear) does not preserve cosine distances, so the selection can differ from the
  official one; the rule is the same. On CLIP/ViT classifiers (no projector) the features are the
  block output itself.
* **Batch.** The code prunes sample 0 of the batch only, at a hard-coded offset (35 system tokens);
  here every sample (crop) is pruned on its own tokens, so results never depend on the batch.
* **Budget.** The code keeps ``round(SUBSET_RATIO * n)`` tokens; here ``num_tokens`` per image or
  crop (``min(num_tokens, n)``).
* **Precision.** The code computes in the model dtype (fp16); here in fp32.
* **Selected tokens.** The code's argmax at ``t >= 2`` runs over every token, already-selected ones
  included (their min distance is their self-distance, ~0); here they are masked, which differs only
  when every remaining token duplicates a selected one, and guarantees ``k`` distinct tokens.
* **LLaVA-NeXT.** The code selects once per *image* over the packed tokens of all its crops (base
  view, sub-crops and ``image_newline`` tokens, which are not in the vision tower). ``per_image=True``
  selects jointly over the patches of all crops of an image (``ctx.image_index``), keeping
  ``num_tokens`` x (its crops) in total (so kept counts per crop differ: a ragged cut); the default
  (``per_image=False``) selects ``num_tokens`` per crop, the pruner contract of ``vlm.pruning``.
* **Qwen towers** (``ctx.token_group = 4``, no CLS): one LLM token is a 2x2 merge unit, so a unit's
  feature is the concatenation of its four patches' hidden states (the merger's input layout) and
  ``num_tokens`` counts units; whole units are kept.

CLS and other non-patch tokens are kept and never scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlm.context import BlockContext, resolve_layer
from vlm.kernels import AttnOutput
from vlm.pruning.base import TokenPruner
from vlm.pruning.registry import register
from vlm.tokens import TokenState, TokenType, kept_first


def max_min_select(feats: Tensor, valid: Tensor, budget: Tensor) -> Tensor:
    """bool ``[R, U]``: the greedy max-min diverse subset (module docstring) of each row's valid
    items ``feats [R, U, F]`` (``valid [R, U]``), ``min(budget[r], valid count)`` of them.

    The loop is the pruner's whole cost at small budgets, so each step is three ops: the argmax,
    the selected token's distance row and a running minimum. A selected token drops out because its
    self-distance is set to -inf (the diagonal), so its running minimum is -inf from then on; an
    invalid token starts at -inf. Keeping every valid token needs no selection (a set, in order)."""
    r, u, _ = feats.shape
    take = budget.clamp(max=valid.sum(1))
    if u == 0 or bool((take >= valid.sum(1)).all()):  # sync: keeping all needs no scoring
        return valid.clone()
    f = feats.float().masked_fill(~valid[..., None], 1.0)
    f = f / f.norm(dim=-1, keepdim=True)
    dist = 1.0 - f @ f.transpose(1, 2)  # [R, i, j]
    neg = torch.tensor(float("-inf"), device=feats.device)
    if u > 1:  # first: the token whose nearest other token is farthest (second smallest of its column)
        col = dist.masked_fill(~valid[:, :, None], float("inf"))
        score = col.topk(2, dim=1, largest=False).values[:, 1]
    else:
        score = torch.zeros(r, u, device=feats.device)
    score = torch.where(valid, score, neg)
    dist.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # a selected token's own row removes it
    rows = torch.arange(r, device=feats.device)
    picks = []
    nearest = torch.where(valid, torch.tensor(float("inf"), device=feats.device), neg)
    for _ in range(int(take.max())):  # sync: the loop length
        idx = score.argmax(1)  # first maximum: ties keep the earlier token
        picks.append(idx)
        nearest = torch.minimum(nearest, dist[rows, idx])  # distance to the nearest selected token
        score = nearest
    steps = torch.stack(picks, 1)  # [R, S]; a row's steps past its budget are not kept
    steps = torch.where(torch.arange(steps.shape[1], device=feats.device)[None] < take[:, None], steps, u)
    chosen = torch.zeros(r, u + 1, dtype=torch.bool, device=feats.device)
    return chosen.scatter_(1, steps, True)[:, :u]


@register("divprune")
class DivPrune(TokenPruner):
    """Greedy max-min cosine-distance selection of the patches (module docstring).

    Args:
        num_tokens: patch tokens (Qwen: merge units) kept per image or crop.
        layer: the block whose output is scored and after which the patches are cut (default: the
            last block of the pass, LLaVA's feature layer).
        per_image: select jointly over all crops of one image (``ctx.image_index``), as the
            official LLaVA-1.6 code does, keeping ``num_tokens`` per crop on average; else per crop.
    """

    def __init__(self, num_tokens: int = 64, layer: int = -1, per_image: bool = False) -> None:
        super().__init__(num_tokens)
        self.layer = layer
        self.per_image = per_image

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        g = ctx.token_group
        b, _, dim = state.x.shape
        patch = state.type_mask(TokenType.PATCH)
        counts = patch.sum(1)
        width = int(counts.max())  # sync: a shape
        index = kept_first(patch, width)  # [B, P]: the patches, in sequence order (padding: repeats)
        units = counts // g
        feats = torch.gather(state.x, 1, index[..., None].expand(-1, -1, dim)).reshape(b, width // g, g * dim)
        valid = torch.arange(width // g, device=state.x.device)[None] < units[:, None]
        budget = torch.full_like(units, self.num_tokens)
        if self.per_image and ctx.image_index is not None:
            chosen = self._joint(ctx.image_index, feats, valid, budget)
        else:
            chosen = max_min_select(feats, valid, budget)
        per_patch = chosen.repeat_interleave(g, dim=1) & (torch.arange(width, device=state.x.device)[None] < counts[:, None])
        scores = torch.zeros(patch.shape, device=state.x.device).scatter_(1, index, per_patch.float())
        count = chosen.sum(1)
        state, _ = self.keep_top(state, scores, count if self.per_image else self.num_tokens, group=g)
        return state

    @staticmethod
    def _joint(image_index: Tensor, feats: Tensor, valid: Tensor, budget: Tensor) -> Tensor:
        """The selection over all rows of each image at once (budgets summed over its rows)."""
        chosen = torch.zeros_like(valid)
        for img in torch.unique(image_index).tolist():  # sync: once per pass
            rows = (image_index == img).nonzero().flatten()
            sel = valid[rows]  # [r, U]
            joint = feats[rows][sel][None]  # [1, T, F], rows in order
            keep = max_min_select(joint, torch.ones(joint.shape[:2], dtype=torch.bool, device=feats.device), budget[rows].sum()[None])[0]
            part = torch.zeros_like(sel)
            part[sel] = keep
            chosen[rows] = part
        return chosen

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}, per_image={self.per_image}"

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        """One cut after ``layer``; ragged when crops of one image share a joint budget."""
        return [resolve_layer(self.layer, num_blocks)], self.per_image
