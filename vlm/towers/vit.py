"""timm ``VisionTransformer`` run block by block, and what every timm trunk runner shares.

:class:`TimmTrunkRunner` holds the part after the blocks that timm's ViT-like classes share
(``pool``, ``fc_norm``, ``head``), with pooling by token type, so that tokens a hook inserted
(prompts) never leak into the pooled feature: average/max pooling reads the PATCH tokens (and the
CLS/register ones with ``pool_include_prefix``), and timm's attention pooling (``global_pool='map'``,
``AttentionPoolLatent``, the SigLIP towers) attends over the tower's own tokens only (CLS, registers,
patches; never inserted tokens, never padding), computed from the pool's own weights through
``vlm.kernels.attention`` with a key-length spec (:func:`attention_pool`).

Parity contract: with no hooks, :meth:`TimmViTRunner.forward_features` equals timm's
``forward_features`` and :meth:`TimmTrunkRunner.forward_head` equals ``forward_head`` (1e-5, fp32)
for ViTs with a CLS token, register tokens, ``no_embed_class`` and ``global_pool`` in ``token``,
``avg``, ``max``, ``avgmax``, ``map``. ``global_pool='prr'`` (a parameter-free self-attention over
every token) is refused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.kernels import AttnSpec, attention
from vlm.tokens import TokenState, TokenType, kept_first, masked_max, masked_mean
from vlm.towers.blocks import BlockAdapter, TimmBlock, merge_heads
from vlm.towers.runner import TowerOutput, TowerPass


def trunk_token_types(model: nn.Module, n: int, device: torch.device) -> Tensor:
    """int8 ``[n]``: CLS (timm's ``cls_token``), then the register tokens, then PATCH."""
    types = torch.full((n,), int(TokenType.PATCH), dtype=torch.int8, device=device)
    n_cls = 1 if getattr(model, "cls_token", None) is not None else 0
    types[:n_cls] = int(TokenType.CLS)
    types[n_cls : model.num_prefix_tokens] = int(TokenType.REGISTER)
    return types


def attention_pool(pool: nn.Module, state: TokenState, keys: Tensor, position_offset: int = 0) -> Tensor:
    """timm ``AttentionPoolLatent`` over the tokens ``keys [B, N]`` (bool) of ``state``.

    The pool's latent query attends over the selected tokens only: they are moved to the front of
    each row (in order) and the rest masked as padding (``AttnSpec.k_lengths``). The pool's
    optional learned position table is read at each token's original index
    (``state.positions - position_offset``). Then ``proj``, ``norm`` + ``mlp`` residual and the
    pool's own reduction (``token``/``avg``) as timm does."""
    x = state.x
    b, n, c = x.shape
    count = keys.sum(1)
    order = kept_first(keys, n)
    xs = torch.gather(x, 1, order[..., None].expand(b, n, c))
    if pool.pos_embed is not None:
        pos = torch.gather(state.positions, 1, order) - position_offset
        pos = pos.clamp(0, pool.pos_embed.shape[0] - 1)
        xs = xs + pool.pos_embed[pos].to(x.dtype)
    heads, hd = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, heads, hd).transpose(1, 2)
    k, v = pool.kv(xs).reshape(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out = attention(q, k, v, AttnSpec(k_lengths=count, scale=float(pool.scale))).out
    y = pool.proj_drop(pool.proj(merge_heads(out)))
    if pool.mlp is not None:
        y = y + pool.mlp(pool.norm(y))
    if pool.pool == "token":
        return y[:, 0]
    if pool.pool == "avg":
        return y.mean(1)
    return y


class TimmTrunkRunner(ABC):
    """What timm trunk runners share: attributes, pooling by token type and the head.

    Subclasses set ``model``, ``blocks``, ``map_include_prefix`` (whether attention pooling reads
    the CLS/register tokens) and implement ``embed`` and ``forward_features``."""

    tower = Tower.VISION
    model: nn.Module
    blocks: list[BlockAdapter]
    map_include_prefix: bool = False

    def _set_sizes(self) -> None:
        m = self.model
        pool = getattr(m, "attn_pool", None)
        if pool is not None and not hasattr(pool, "latent"):
            raise TypeError(
                f"timm attention pooling {type(pool).__name__} (global_pool={m.global_pool!r}) is not supported by "
                "the runner; only 'map' (AttentionPoolLatent) is. Build the model with global_pool='token' or 'avg'."
            )
        self.width = int(m.embed_dim)
        self.num_layers = len(self.blocks)
        self.heads = self.blocks[0].heads
        self.num_prefix_tokens = int(m.num_prefix_tokens)

    @abstractmethod
    def embed(self, images: Tensor) -> TokenState:
        """Patch embedding, prefix tokens and positions: the state before block 0."""

    @abstractmethod
    def forward_features(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TokenState:
        """Every block with ``hooks``, then the final norm."""

    def pool(self, state: TokenState) -> Tensor:
        """timm's ``pool`` of the final tokens (after the final norm), by token type."""
        m = self.model
        if getattr(m, "attn_pool", None) is not None:
            kinds = [TokenType.PATCH]
            if self.map_include_prefix:
                kinds += [TokenType.CLS, TokenType.REGISTER]
            offset = 0 if self.map_include_prefix else self.num_prefix_tokens
            return attention_pool(m.attn_pool, state, state.type_mask(*kinds), offset)
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


class TimmViTRunner(TimmTrunkRunner):
    """patch_embed -> _pos_embed -> hooks start -> patch_drop -> norm_pre -> blocks -> norm -> pool."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = [TimmBlock(b) for b in model.blocks]
        self.map_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        self._set_sizes()

    def embed(self, images: Tensor) -> TokenState:
        m = self.model
        x = m._pos_embed(m.patch_embed(images))
        return TokenState.create(x, trunk_token_types(m, x.shape[1], x.device))

    def forward_features(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TokenState:
        m = self.model
        run = TowerPass(self.tower, self.blocks, hooks)
        state = run.start(self.embed(images))
        if not isinstance(m.patch_drop, nn.Identity) and m.training:
            raise TypeError("timm patch_drop_rate > 0 is not supported by the runner; set patch_drop_rate=0.")
        state = state.replace(x=m.norm_pre(state.x))
        state = run.run(state)
        return state.replace(x=m.norm(state.x))
