"""timm ``Eva`` (``timm/models/eva.py``: EVA02, DINOv3, the RoPE ViTs, PE) run block by block.

What timm's ``Eva`` computes, and how this runner reproduces it:

* **Embedding.** ``patch_embed`` then ``_pos_embed`` (CLS and register tokens, the optional
  absolute table, ``pos_drop``), which also returns the rotary table of the patch grid: ``[Np, 2d]``
  (``sin | cos`` of each patch, head dim ``d``), or ``[depth, H, Np, 2d]`` for ``rope_type='mixed'``
  (one per block and head). The runner calls the model's own ``_pos_embed`` once per pass.
* **Rotary embedding by position.** timm rotates q and k of every token after the prefix
  (``num_prefix_tokens``) by the table row of its sequence slot. Here each token is rotated by
  the row of its *original* index (``TokenState.positions``): a patch keeps its angles when a hook
  inserts prompts before it or prunes tokens around it; CLS/register tokens and inserted tokens
  (position -1) are not rotated (identity rows: ``sin 0, cos 1``, which leave q and k unchanged).
  The rotation itself is timm's ``apply_rot_embed_cat`` (interleaved or half layout).
* **Blocks.** ``EvaBlock`` (pre-norm, layer scale ``gamma_1/gamma_2``, SwiGLU or plain MLP, an
  optional norm inside attention) and ``EvaBlockPostNorm``; attention ``EvaAttention`` (fused qkv
  with ``q_bias``/``v_bias`` and a zero k bias, or separate q/k/v) or ``AttentionRope`` (fused or
  separate, grouped-query k/v heads); optional q/k norm. The attention product goes through
  ``vlm.kernels.attention``. Gated attention (``gated_attn``) is refused.
* **Head.** ``norm``, then timm's pooling by token type (``TimmTrunkRunner``), ``fc_norm``,
  ``head``. Eva's attention pooling reads every own token (CLS and registers included).

Per-token rotary rows reach the blocks through a small per-pass object the runner sets
(:class:`PassRope`), kept current by a hook of the runner's own (:class:`~vlm.towers.runner.PositionTracker`, last in the
pass), so a scoring hook's ``ctx.block.qkv(ctx.block.attn_input(state.x))`` rotates as the block
does. ``TowerPass`` is used unchanged.

Parity contract: with no hooks, :meth:`EvaRunner.forward_features` equals timm's
``model.forward_features`` and ``forward_head(state, pre_logits=True)`` equals
``model.forward_head(x, pre_logits=True)`` (1e-5, fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaBlockPostNorm
from torch import Tensor, nn
from torch.nn import functional as F

from vlm.hooks import TowerHook
from vlm.kernels import AttnOutput, AttnSpec, attention
from vlm.tokens import TokenState
from vlm.towers.blocks import BlockAdapter, merge_heads
from vlm.towers.runner import PositionTracker, TowerPass
from vlm.towers.vit import TimmTrunkRunner, trunk_token_types


# --- the rotary table of one pass ------------------------------------------------------------
@dataclass
class PassRope:
    """The rotary embedding of one pass: timm's ``table`` (``[Np, 2d]``, or ``[depth, H, Np, 2d]``
    when ``per_layer``), the number of prefix tokens (CLS + registers, never rotated), and
    ``positions [B, N]``: the tokens of the state the pass is at (:class:`~vlm.towers.runner.PositionTracker`)."""

    table: Tensor
    num_prefix: int
    per_layer: bool
    positions: Optional[Tensor] = None
    _padded: Optional[Tensor] = field(default=None, repr=False)
    _cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def padded(self) -> Tensor:
        """The table with one identity row (``sin 0 | cos 1``) in front: ``[..., 1 + Np, 2d]``."""
        if self._padded is None:
            t = self.table
            d = t.shape[-1] // 2
            ident = torch.cat([t.new_zeros(d), t.new_ones(d)]).expand(*t.shape[:-2], 1, 2 * d)
            self._padded = torch.cat([ident, t], dim=-2)
        return self._padded

    def rows(self, positions: Tensor, layer: int) -> Tensor:
        """``[B, 1 or H, N, 2d]``: the rotary row of each token at ``positions [B, N]`` (original
        sequence index; prefix and inserted tokens get the identity row)."""
        key = layer if self.per_layer else -1
        hit = self._cache.get(key)
        if hit is not None and hit[0] is positions:
            return hit[1]
        n_patches = self.table.shape[-2]
        index = torch.where(positions >= self.num_prefix, positions - self.num_prefix + 1, 0)
        index = index.clamp(max=n_patches)
        table = self.padded()
        if self.per_layer:
            rows = table[layer][:, index].transpose(0, 1)  # [H, B, N, 2d] -> [B, H, N, 2d]
        else:
            rows = table[index].unsqueeze(1)  # [B, 1, N, 2d]
        self._cache[key] = (positions, rows)
        return rows


class RopeRef:
    """The runner's handle on the rotary table of the pass in progress, or of the last one
    (``current``), shared with its blocks; ``uses_rope``: the model has a rotary embedding."""

    def __init__(self, uses_rope: bool) -> None:
        self.uses_rope = uses_rope
        self.current: Optional[PassRope] = None
        self.depth = 0  # passes in progress (a hook may run the tower inside a pass)


# --- one block ---------------------------------------------------------------------------------
class _Gamma:
    """timm's layer scale ``gamma * x`` (identity when the block has none)."""

    def __init__(self, gamma: Optional[Tensor]) -> None:
        self.gamma = gamma

    def __call__(self, x: Tensor) -> Tensor:
        return x if self.gamma is None else self.gamma * x


class EvaBlock(BlockAdapter):
    """One timm ``EvaBlock`` / ``EvaBlockPostNorm`` with q and k rotated by each token's original
    position (module docstring); the block's own weights, attention through ``vlm.kernels``."""

    def __init__(self, block: nn.Module, ref: RopeRef, layer: int) -> None:
        attn = block.attn
        if getattr(attn, "gate", None) is not None:
            raise TypeError(
                "timm Eva blocks with gated attention (gated_attn=True) are not supported by the runner; "
                "build the model with gated_attn=False."
            )
        self.block, self.attn, self.ref, self.layer = block, attn, ref, layer
        self.post_norm = isinstance(block, EvaBlockPostNorm)
        self.heads = int(attn.num_heads)
        self.kv_heads = int(getattr(attn, "num_kv_heads", attn.num_heads))
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        self.half = bool(getattr(attn, "rotate_half", False))
        self.ls1 = _Gamma(getattr(block, "gamma_1", None))
        self.ls2 = _Gamma(getattr(block, "gamma_2", None))

    def attn_input(self, x: Tensor) -> Tensor:
        return x if self.post_norm else self.block.norm1(x)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[B, H, N, d]``, k and v ``[B, Hkv, N, d]`` before the rotation, q/k normed."""
        a = self.attn
        b, n, _ = x.shape
        if a.qkv is not None:
            q_bias = getattr(a, "q_bias", None)
            if q_bias is None:
                qkv = a.qkv(x)
            else:  # EvaAttention: learned q and v biases, a zero k bias
                bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
                qkv = a.qkv(x) + bias if getattr(a, "qkv_bias_separate", False) else F.linear(x, a.qkv.weight, bias)
            q, k, v = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = a.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return a.q_norm(q), a.k_norm(k), v

    def values(self, x: Tensor) -> Tensor:
        """``v [B, H, N, d]`` of any tokens (values are not rotated)."""
        v = self._project(x)[2]
        return v.repeat_interleave(self.heads // self.kv_heads, dim=1) if self.kv_heads != self.heads else v

    def qkv(self, x: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head ``q, k, v [B, H, N, d]`` of the normalised ``x [B, N, D]``, q and k rotated by
        the rows of the tokens at ``positions [B, N]`` (default: the state the pass is at)."""
        q, k, v = self._project(x)
        rope = self.ref.current
        if rope is None and self.ref.uses_rope:
            raise RuntimeError(
                "EvaBlock.qkv: the model rotates q and k, but no pass has run yet to give the rotary table of the "
                "image grid; call it from a hook during a pass (or after one, for that pass's tokens)."
            )
        if rope is not None:
            positions = rope.positions if positions is None else positions
            if positions is None or positions.shape != x.shape[:2]:
                got = None if positions is None else tuple(positions.shape)
                raise ValueError(
                    f"EvaBlock.qkv: {tuple(x.shape[:2])} tokens but positions {got}; pass the state's positions "
                    "(qkv(x, state.positions)) when projecting tokens of a state other than the one the pass is at."
                )
            rows = rope.rows(positions, self.layer)
            q = apply_rot_embed_cat(q, rows, half=self.half).type_as(v)
            k = apply_rot_embed_cat(k, rows, half=self.half).type_as(v)
        if self.kv_heads != self.heads:  # grouped-query attention: head h reads kv head h // groups
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def attn_out(self, o: Tensor) -> Tensor:
        a = self.attn
        return a.proj_drop(a.proj(a.norm(o)))

    def __call__(self, state: TokenState, spec: AttnSpec) -> tuple[TokenState, AttnOutput]:
        blk = self.block
        x = state.x
        queries = state.query_index()
        q, k, v = self.qkv(self.attn_input(x), state.positions)
        if queries is not None:
            q = q.index_select(2, queries)
            x = x.index_select(1, queries)
        if spec.scale is None:
            spec = spec.replace(scale=self.scale)
        out = attention(q, k, v, spec)
        a = self.attn_out(merge_heads(out.out))
        if self.post_norm:
            x = x + blk.drop_path1(blk.norm1(a))
            x = x + blk.drop_path2(blk.norm2(blk.mlp(x)))
        else:
            x = x + blk.drop_path1(self.ls1(a))
            x = x + blk.drop_path2(self.ls2(blk.mlp(blk.norm2(x))))
        return state.drop_kv_only(x, queries), out


# --- the runner --------------------------------------------------------------------------------
class EvaRunner(TimmTrunkRunner):
    """patch_embed -> _pos_embed (+ rotary table) -> hooks start -> norm_pre -> blocks -> norm -> pool.

    Same interface as :class:`~vlm.towers.vit.TimmViTRunner`; token types CLS / REGISTER / PATCH."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ref = RopeRef(getattr(model, "rope", None) is not None)
        self.blocks = [EvaBlock(b, self.ref, i) for i, b in enumerate(model.blocks)]
        self.map_include_prefix = True  # Eva's attention pooling reads every token
        self._set_sizes()

    def _embed(self, images: Tensor) -> tuple[TokenState, Optional[Tensor]]:
        m = self.model
        if m.patch_drop is not None and m.training:
            raise TypeError("timm Eva patch_drop_rate > 0 is not supported by the runner; set patch_drop_rate=0.")
        x, table = m._pos_embed(m.patch_embed(images))
        state = TokenState.create(x, trunk_token_types(m, x.shape[1], x.device))
        return state, table

    def embed(self, images: Tensor) -> TokenState:
        return self._embed(images)[0]

    def forward_features(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TokenState:
        m = self.model
        state, table = self._embed(images)
        rope = None
        if table is not None:
            per_layer = bool(getattr(m, "rope_mixed", False))
            if table.dim() != (4 if per_layer else 2):
                raise TypeError(
                    f"timm Eva returned a rotary table of shape {tuple(table.shape)}; the runner takes one table "
                    "for the grid ([Np, 2d], or [depth, H, Np, 2d] for rope_type='mixed')."
                )
            rope = PassRope(table, self.num_prefix_tokens, per_layer)
        hooks = [*(hooks or ())] + ([PositionTracker(rope)] if rope is not None else [])
        previous, self.ref.current = self.ref.current, rope
        self.ref.depth += 1
        try:
            run = TowerPass(self.tower, self.blocks, hooks)
            state = run.start(state)
            state = state.replace(x=m.norm_pre(state.x))
            state = run.run(state)
        finally:  # a pass run inside another (from a hook) gives the outer one back its table
            self.ref.depth -= 1
            if self.ref.depth > 0:
                self.ref.current = previous
        return state.replace(x=m.norm(state.x))
