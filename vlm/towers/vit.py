"""timm ``VisionTransformer`` run block by block.

Parity contract: with no hooks, :meth:`TimmViTRunner.forward_features` equals timm's
``forward_features`` and :meth:`forward_head` equals ``forward_head`` (1e-5, fp32) for ViTs with
a CLS token, register tokens, ``no_embed_class`` and ``global_pool='avg'``. Pooling is by token
type, so prompt tokens never leak into average pooling.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.tokens import TokenState, TokenType
from vlm.towers.blocks import TimmBlock
from vlm.tokens import masked_max, masked_mean
from vlm.towers.runner import TowerOutput, TowerPass


class TimmViTRunner:
    """patch_embed -> _pos_embed -> hooks start -> patch_drop -> norm_pre -> blocks -> norm -> pool."""

    tower = Tower.VISION

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "attn_pool", None) is not None:
            raise TypeError("timm ViTs with attention pooling ('map') are not supported by the runner.")
        self.model = model
        self.blocks = [TimmBlock(b) for b in model.blocks]
        self.width = model.embed_dim
        self.num_layers = len(self.blocks)
        self.heads = self.blocks[0].heads
        self.num_prefix_tokens = model.num_prefix_tokens

    def embed(self, images: Tensor) -> TokenState:
        m = self.model
        x = m._pos_embed(m.patch_embed(images))
        types = torch.full((x.shape[1],), int(TokenType.PATCH), dtype=torch.int8, device=x.device)
        n_cls = 1 if m.cls_token is not None else 0
        types[:n_cls] = int(TokenType.CLS)
        types[n_cls : m.num_prefix_tokens] = int(TokenType.REGISTER)
        return TokenState.create(x, types)

    def forward_features(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TokenState:
        m = self.model
        run = TowerPass(self.tower, self.blocks, hooks)
        state = run.start(self.embed(images))
        if not isinstance(m.patch_drop, nn.Identity) and m.training:
            raise TypeError("timm patch_drop_rate > 0 is not supported by the runner; set patch_drop_rate=0.")
        state = state.replace(x=m.norm_pre(state.x))
        state = run.run(state)
        return state.replace(x=m.norm(state.x))

    def pool(self, state: TokenState) -> Tensor:
        m = self.model
        kind = m.global_pool
        if kind == "token":
            return state.first_of_type(TokenType.CLS)
        if not kind:
            return state.x
        reduce_types = [TokenType.PATCH]
        if getattr(m, "pool_include_prefix", False):
            reduce_types += [TokenType.CLS, TokenType.REGISTER]
        mask = state.type_mask(*reduce_types)
        if kind == "avg":
            return masked_mean(state.x, mask)
        if kind == "max":
            return masked_max(state.x, mask)
        if kind == "avgmax":
            return 0.5 * (masked_mean(state.x, mask) + masked_max(state.x, mask))
        raise TypeError(f"timm global_pool={kind!r} is not supported by the runner.")

    def forward_head(self, state: TokenState, pre_logits: bool = False) -> Tensor:
        m = self.model
        x = m.head_drop(m.fc_norm(self.pool(state)))
        return x if pre_logits else m.head(x)

    def __call__(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        state = self.forward_features(images, hooks)
        return TowerOutput(self.forward_head(state, pre_logits=True), state)
