"""Hugging Face ``CLIPVisionTransformer`` (LLaVA's vision tower) run block by block.

Parity contract: with no hooks, :meth:`HFClipVisionRunner.hidden_state` equals
``CLIPVisionModel(..., output_hidden_states=True).hidden_states[i]`` and :meth:`pooled` equals its
``pooler_output`` (tests check fp32 tolerance). The runner reads the library modules' weights; the
attention product goes through ``vlm.kernels.attention``, so hooks can ask for CLS-row probes
(``AttnSpec.probe_rows``) without forcing eager attention anywhere.

Hidden-state indexing follows transformers: index 0 is the input of block 0 (after
``pre_layrnorm``), index ``i`` the output of block ``i - 1``. Running to a feature layer therefore
runs only the blocks below it (LLaVA's ``vision_feature_layer=-2`` skips the last block).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.context import Tower, resolve_layer
from vlm.hooks import TowerHook
from vlm.tokens import TokenState, TokenType
from vlm.towers.blocks import PreNormBlock, split_heads
from vlm.towers.runner import TowerPass


class HFClipBlock(PreNormBlock):
    """transformers ``CLIPEncoderLayer``: pre-norm attention (separate q/k/v projections) + MLP."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.self_attn
        super().__init__(layer.layer_norm1, layer.layer_norm2, layer.mlp, nn.Identity(), nn.Identity())
        self.attn = attn
        self.heads = attn.num_heads
        self.scale = float(attn.scale)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.attn
        return split_heads(a.q_proj(x), self.heads), split_heads(a.k_proj(x), self.heads), split_heads(a.v_proj(x), self.heads)

    def attn_out(self, o: Tensor) -> Tensor:
        return self.attn.out_proj(o)


class HFClipVisionRunner:
    """embeddings -> pre_layrnorm -> hooks start -> blocks (up to a feature layer) -> hooks end."""

    tower = Tower.VISION

    def __init__(self, vision_model: nn.Module) -> None:
        if hasattr(vision_model, "vision_model"):  # CLIPVisionModel wraps CLIPVisionTransformer
            vision_model = vision_model.vision_model
        if not hasattr(vision_model, "pre_layrnorm") or not hasattr(vision_model, "encoder"):
            raise TypeError(f"{type(vision_model).__name__} is not a transformers CLIPVisionTransformer.")
        self.model = vision_model
        self.blocks = [HFClipBlock(layer) for layer in vision_model.encoder.layers]
        self.num_layers = len(self.blocks)
        self.width = vision_model.config.hidden_size
        self.heads = self.blocks[0].heads
        self.patch_size = vision_model.config.patch_size

    def blocks_for(self, feature_layer: int) -> int:
        """How many blocks produce ``hidden_states[feature_layer]`` (negative counts from the end)."""
        # hidden_states has num_layers + 1 entries (the embeddings first): entry i follows i blocks
        return resolve_layer(feature_layer, self.num_layers + 1, "the vision hidden states (embeddings + blocks)")

    def embed(self, pixel_values: Tensor) -> TokenState:
        m = self.model
        x = m.pre_layrnorm(m.embeddings(pixel_values.to(m.embeddings.patch_embedding.weight.dtype)))
        types = torch.full((x.shape[1],), int(TokenType.PATCH), dtype=torch.int8, device=x.device)
        types[0] = int(TokenType.CLS)
        return TokenState.create(x, types)

    def hidden_state(
        self,
        pixel_values: Tensor,
        feature_layer: int = -1,
        hooks: Optional[Iterable[TowerHook]] = None,
        image_index: Optional[Tensor] = None,
    ) -> TokenState:
        """The token state at ``hidden_states[feature_layer]`` (hooks may have pruned it).
        ``image_index [B]``: the image each row belongs to, when rows are views of one image."""
        run = TowerPass(self.tower, self.blocks[: self.blocks_for(feature_layer)], hooks, image_index)
        return run.run(run.start(self.embed(pixel_values)))

    def pooled(self, pixel_values: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> Tensor:
        """``post_layernorm`` of the final CLS token (transformers' ``pooler_output``)."""
        state = self.hidden_state(pixel_values, -1, hooks)
        return self.model.post_layernorm(state.x[:, 0])
