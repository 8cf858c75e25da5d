"""KTPP: K-NN Transformer with Pyramid Prompts for few-shot learning (Li, Wang, Zhao, Yin; ACM MM 2024).

Two parts, applied to a ViT (timm, or a CLIP image tower) block by block:

* **KCA, k-NN context attention.** In every layer of stage s, each query row keeps only its
  ``k_s`` largest logits (``A_hat = Mask_kNN(Q K^T / sqrt(d))``), the softmax is renormalised over
  them, and a context prompt is added: ``o = softmax(A_hat) V + alpha_l * z_cp`` with a learnable
  ``alpha_l`` per layer. This is ``AttnSpec(topk=k_s, epilogue_add=alpha_l * z_cp)``, so the fused
  kernel serves it. The layers form ``len(stage_topk)`` (three) cascaded stages of equal depth
  whose k shrinks, progressively suppressing irrelevant tokens.
* **PCP, pyramid cross-modal prompts.** Class-aware prompts come from the text embeddings of the
  episode's class names ``T [C, E]``: at stage s, ``P_s = T W_s`` (bias-free, E -> D); they
  interact with the visual feature map pooled to a ``g_s x g_s`` grid,
  ``F_s = AvgPool_{g_s}(patches)``, by cross-attention ``P_s <- P_s + gamma_s softmax(P_s F_s^T /
  sqrt(D)) F_s``, a different scale per stage (the pyramid). The prompts enter every layer of
  their stage as key/value-only tokens, so visual tokens re-weight themselves against them
  inside KCA (prompts compete in the top-k like any token).

The paper body is not available; each open choice is explicit here and a constructor argument:

* ``context="mean_tokens"``: z_cp is the mean of the value vectors of all (valid) tokens,
  ``z_cp = mean_j v_j`` per head, as the abstract says ("the mean of all tokens"); it is computed
  exactly as ``W_v mean_j LN1(x_j) + b_v``. ``"none"`` switches it off. (The other reading, the
  mean of the k-NN attention output, needs the output first and is not offered.)
* ``stage_topk``: one k per stage; a value <= 1 is a fraction of the keys (rounded up), > 1 a count.
  Top-k is per (batch, head, row); ties keep all (the AttnSpec rule).
* ``alpha_init`` (default 0): the untrained model is the backbone with k-NN attention.
* ``pyramid_grids``: pooling grid per stage (default 4, 2, 1: fine to coarse). A non-square
  patch count is pooled as a 1-D sequence to g*g cells.
* All episode images (support and query) see the prompts of *all* the episode's classes, so no
  label reaches a query image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.kernels import AttnSpec
from vlm.context import BlockContext, Tower
from vlm.prompts.base import PromptLearner
from vlm.prompts.registry import register
from vlm.protocols import ImageTextBackbone, tower_runner
from vlm.tokens import TokenState, TokenType, check, prefix_length



def resolve_topk(value: float, num_keys: int) -> int:
    """``value`` <= 1: ``ceil(value * num_keys)``; otherwise ``min(int(value), num_keys)``; at least 1."""
    k = math.ceil(value * num_keys) if value <= 1 else int(value)
    return max(1, min(k, num_keys))


def pool_grid(patches: Tensor, grid: int) -> Tensor:
    """Average-pool patch tokens ``[B, Np, D]`` to ``[B, grid * grid, D]`` (2-D if Np is square)."""
    b, n, d = patches.shape
    side = math.isqrt(n)
    if side * side == n:
        fmap = patches.transpose(1, 2).reshape(b, d, side, side)
        return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(patches.transpose(1, 2), grid * grid).transpose(1, 2)


@register("ktpp")
class KTPP(PromptLearner):
    """K-NN context attention + pyramid cross-modal prompts (see the module docstring).

    Args:
        stage_topk: k per cascaded stage (fraction of keys if <= 1, else a count).
        context: ``mean_tokens`` (z_cp = mean of V) or ``none``.
        alpha_init: initial context weight alpha of every layer.
        pyramid: use the class-aware pyramid prompts (needs class text embeddings per episode).
        pyramid_grids: pooling grid of each stage's visual features.
        gamma_init: initial weight of the cross-modal interaction term.
        text_dim: width E of the class text embeddings (defaults to the backbone's ``embed_dim``).
    """

    towers = (Tower.VISION,)

    def __init__(
        self,
        stage_topk: Sequence[float] = (0.75, 0.5, 0.25),
        context: str = "mean_tokens",
        alpha_init: float = 0.0,
        pyramid: bool = True,
        pyramid_grids: Sequence[int] = (4, 2, 1),
        gamma_init: float = 1.0,
        text_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not stage_topk or any(k <= 0 for k in stage_topk):
            raise ValueError(f"KTPP stage_topk must be positive values; got {stage_topk}.")
        if context not in ("mean_tokens", "none"):
            raise ValueError(f"KTPP context must be 'mean_tokens' or 'none'; got {context!r}.")
        if pyramid and len(pyramid_grids) != len(stage_topk):
            raise ValueError("KTPP needs one pyramid grid per stage (len(pyramid_grids) == len(stage_topk)).")
        self.stage_topk = [float(k) for k in stage_topk]
        self.context, self.alpha_init, self.pyramid = context, alpha_init, pyramid
        self.pyramid_grids = [int(g) for g in pyramid_grids]
        self.gamma_init, self.class_text_width = gamma_init, text_dim
        self.num_layers = 0
        self.class_embeddings: Optional[Tensor] = None
        self.register_parameter("alpha", None)
        self.register_parameter("gamma", None)
        self.t2i = nn.ModuleList()

    @property
    def num_stages(self) -> int:
        return len(self.stage_topk)

    def build(self, backbone: Any) -> None:
        """alpha per layer, and per stage a text-to-image projection and interaction weight."""
        super().build(backbone)
        runner = tower_runner(backbone, Tower.VISION, "KTPP")
        dim, self.num_layers = int(runner.width), int(runner.num_layers)
        if self.num_layers < self.num_stages:
            raise ValueError(f"KTPP: {self.num_stages} stages need at least as many layers; the tower has {self.num_layers}.")
        ref = next(iter(backbone.parameters()))
        kw = dict(dtype=ref.dtype, device=ref.device)
        self.alpha = nn.Parameter(torch.full((self.num_layers,), float(self.alpha_init), **kw))
        if self.pyramid:
            e = self.class_text_width if self.class_text_width is not None else (backbone.embed_dim if isinstance(backbone, ImageTextBackbone) else None)
            if e is None:
                raise ValueError("KTPP pyramid prompts need text_dim (the class text embedding width).")
            self.class_text_width = int(e)
            self.t2i = nn.ModuleList(nn.Linear(self.class_text_width, dim, bias=False, **kw) for _ in range(self.num_stages))
            self.gamma = nn.Parameter(torch.full((self.num_stages,), float(self.gamma_init), **kw))

    @property
    def needs_class_text(self) -> bool:  # type: ignore[override]
        """The pyramid prompts are made from the class text embeddings."""
        return self.pyramid

    @property
    def text_dim(self) -> Optional[int]:
        """The constructor's name for :attr:`class_text_width`."""
        return self.class_text_width

    def set_class_text(self, embeddings: Optional[Tensor]) -> None:
        """The episode's class text embeddings ``[C, E]`` (or ``[B, C, E]``), used by the next passes."""
        self.class_embeddings = embeddings

    def stage(self, layer: int) -> int:
        """Stage of ``layer``: ``num_stages`` contiguous groups of (nearly) equal depth."""
        return min(layer * self.num_stages // self.num_layers, self.num_stages - 1)

    # --- PCP --------------------------------------------------------------------------------------
    def class_prompts(self, stage: int, patches: Tensor) -> Tensor:
        """``P_s + gamma_s softmax(P_s F_s^T / sqrt(D)) F_s`` for the patches ``[B, Np, D]``."""
        t = self.class_embeddings
        if t is None:
            raise RuntimeError("KTPP pyramid prompts need set_class_text(...) before the forward pass.")
        t = t.to(device=patches.device, dtype=patches.dtype)
        p = self.t2i[stage](t)
        p = p.expand(patches.shape[0], -1, -1) if p.dim() == 2 else p  # [B, C, D]
        fmap = pool_grid(patches, self.pyramid_grids[stage])
        attn = (p @ fmap.transpose(1, 2) / math.sqrt(p.shape[-1])).softmax(-1)
        return p + self.gamma[stage] * (attn @ fmap)

    @dataclass
    class PassState:
        """``prefix``: the pyramid prompts' insertion index (CLS/registers are never cut or moved)."""

        prefix: Optional[int] = None

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        if self.alpha is None:
            raise RuntimeError("KTPP used before build(backbone).")
        if not self.pyramid:
            return state
        types = state.batch_types
        is_patch = types == int(TokenType.PATCH)
        check(is_patch.sum(1) == is_patch[0].sum(), "KTPP pyramid prompts need the same number of patch tokens in every sample.")
        # sync: the patch count sets the shape (a pruner may cut patches between blocks)
        patches = state.x[is_patch].view(state.x.shape[0], -1, state.x.shape[-1])
        prompts = self.class_prompts(self.stage(ctx.layer), patches)
        st = ctx.state(self)
        if st.prefix is None:  # CLS/registers are never cut or moved: the insertion index is fixed for the pass
            st.prefix = prefix_length(types, "KTPP")
        return state.insert(st.prefix, prompts, TokenType.PROMPT, kv_only=True)

    # --- KCA --------------------------------------------------------------------------------------
    def context_vector(self, ctx: BlockContext, state: TokenState) -> Tensor:
        """``z_cp [B, H, dh]``: the mean value vector of the valid tokens, ``W_v mean_j LN1(x_j) + b_v``,
        with the block's own norm and projection (``ctx.block``)."""
        block = ctx.block
        xn = block.attn_input(state.x)
        b, n, _ = xn.shape
        valid = torch.ones(b, n, dtype=xn.dtype, device=xn.device)
        if state.lengths is not None:
            valid = (torch.arange(n, device=xn.device)[None] < state.lengths[:, None]).to(xn.dtype)
        mean = (xn * valid[..., None]).sum(1, keepdim=True) / valid.sum(1).clamp(min=1)[:, None, None]
        v = block.values(mean)
        return v[:, :, 0]

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        if spec.topk is not None or spec.epilogue_add is not None:
            raise ValueError("KTPP cannot combine with another hook that sets top-k or an epilogue.")
        k = resolve_topk(self.stage_topk[self.stage(ctx.layer)], state.x.shape[1])
        epilogue = None
        if self.context == "mean_tokens":
            epilogue = self.alpha[ctx.layer] * self.context_vector(ctx, state)
        return spec.replace(topk=k, epilogue_add=epilogue)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, stage_topk={self.stage_topk}, context={self.context!r}, "
            f"pyramid={self.pyramid}, pyramid_grids={self.pyramid_grids}, text_dim={self.text_dim}"
        )
