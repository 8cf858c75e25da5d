"""Block adapters: run one library transformer block on a :class:`TokenState` with our attention.

An adapter holds a reference to the library's block and uses its own weights (norms, projections,
MLP, layer scale, drop path); only the attention product is routed through
``vlm.kernels.attention(q, k, v, spec)``. Nothing in the library module is modified.

Key/value-only tokens (``state.kv_only``) provide keys and values but get no query row and no MLP;
the runner drops them after the block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

from torch import Tensor, nn

from vlm.kernels import AttnOutput, AttnSpec, attention
from vlm.tokens import TokenState


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, H*d] -> [B, H, N, d]``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, N, d] -> [B, N, H*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class BlockAdapter(ABC):
    """Runs one library block. A plain object holding references to the library's modules (not an
    ``nn.Module``), so the library model stays the only owner of its parameters and state dict."""

    heads: int
    scale: Optional[float] = None

    @abstractmethod
    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head ``q, k, v [B, H, N, d]`` from the block's (normalised) input."""

    def values(self, x: Tensor) -> Tensor:
        """Per-head ``v [B, H, N, d]`` only (no rotary or other position-dependent step, so any tokens
        may be projected; blocks whose ``qkv`` rotates q and k override it)."""
        return self.qkv(x)[2]

    @abstractmethod
    def attn_out(self, o: Tensor) -> Tensor:
        """The block's output projection of the merged heads ``[B, N, H*d]``."""

    def attn_input(self, x: Tensor) -> Tensor:
        """What :meth:`qkv` reads from the residual ``x``: the pre-attention norm (identity for a
        post-norm block). Scoring hooks use it with :meth:`qkv` to project as the block does."""
        return x

    def _attend(
        self, xn: Tensor, spec: AttnSpec, queries: Tensor | None = None
    ) -> tuple[Tensor, AttnOutput]:
        """``queries``: ``state.query_index()`` (None: every token is a query)."""
        q, k, v = self.qkv(xn)
        if queries is not None:
            q = q.index_select(2, queries)
        if spec.scale is None and self.scale is not None:
            spec = spec.replace(scale=self.scale)
        out = attention(q, k, v, spec)
        return self.attn_out(merge_heads(out.out)), out


class PreNormBlock(BlockAdapter):
    """``x + ls1(drop(attn(norm1 x)))`` then ``x + ls2(drop(mlp(norm2 x)))`` (open_clip, timm)."""

    def __init__(
        self,
        norm1: nn.Module,
        norm2: nn.Module,
        mlp: nn.Module,
        ls1: nn.Module,
        ls2: nn.Module,
        drop1: Optional[nn.Module] = None,
        drop2: Optional[nn.Module] = None,
    ) -> None:
        self.norm1, self.norm2, self.mlp, self.ls1, self.ls2 = norm1, norm2, mlp, ls1, ls2
        self.drop1 = drop1 if drop1 is not None else nn.Identity()
        self.drop2 = drop2 if drop2 is not None else nn.Identity()

    def attn_input(self, x: Tensor) -> Tensor:
        return self.norm1(x)

    def __call__(self, state: TokenState, spec: AttnSpec) -> tuple[TokenState, AttnOutput]:
        x = state.x
        queries = state.query_index()
        a, out = self._attend(self.norm1(x), spec, queries)
        if queries is not None:
            x = x.index_select(1, queries)
        x = x + self.drop1(self.ls1(a))
        x = x + self.drop2(self.ls2(self.mlp(self.norm2(x))))
        return state.drop_kv_only(x, queries), out


class OpenClipBlock(PreNormBlock):
    """open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside)."""

    def __init__(self, block: nn.Module) -> None:
        mha = getattr(block, "attn", None)
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
            raise TypeError(
                f"{type(block).__name__} is not an open_clip ResidualAttentionBlock with self-attention; "
                "custom-attention blocks (qk-norm, scaled cosine) are not supported by the tower runner."
            )
        super().__init__(block.ln_1, block.ln_2, block.mlp, block.ls_1, block.ls_2)
        self.mha = mha
        self.heads = mha.num_heads

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
        q, k, v = nn.functional.linear(x, w, b).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def attn_out(self, o: Tensor) -> Tensor:
        return self.mha.out_proj(o)


class TimmBlock(PreNormBlock):
    """timm ``Block`` with the standard ``Attention`` (fused qkv, optional q/k norm)."""

    def __init__(self, block: nn.Module) -> None:
        attn = block.attn
        if not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            raise TypeError(f"{type(attn).__name__} is not a supported timm Attention (fused qkv, no gate).")
        super().__init__(
            block.norm1, block.norm2, block.mlp, block.ls1, block.ls2, block.drop_path1, block.drop_path2
        )
        self.attn = attn
        self.heads = attn.num_heads
        self.scale = float(attn.scale)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.attn.q_norm(q), self.attn.k_norm(k), v

    def attn_out(self, o: Tensor) -> Tensor:
        o = getattr(self.attn, "norm", nn.Identity())(o)
        return self.attn.proj_drop(self.attn.proj(o))


class BertBlock(BlockAdapter):
    """HF BERT-family ``BertLayer`` (post-norm): attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, layer: nn.Module) -> None:
        self_attn = layer.attention.self
        self.layer = layer
        self.self_attn = self_attn
        self.heads = self_attn.num_attention_heads

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.self_attn
        return (split_heads(a.query(x), self.heads), split_heads(a.key(x), self.heads), split_heads(a.value(x), self.heads))

    def attn_out(self, o: Tensor) -> Tensor:
        return o

    def __call__(self, state: TokenState, spec: AttnSpec) -> tuple[TokenState, AttnOutput]:
        x = state.x
        queries = state.query_index()
        a, out = self._attend(x, spec, queries)
        if queries is not None:
            x = x.index_select(1, queries)
        h = self.layer.attention.output(a, x)  # dense, dropout, LayerNorm(h + x)
        y = self.layer.output(self.layer.intermediate(h), h)
        return state.drop_kv_only(y, queries), out


BlockFactory = Callable[[nn.Module], BlockAdapter]
