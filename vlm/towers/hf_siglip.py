"""Hugging Face SigLIP (and SigLIP 2 at a fixed square grid) run block by block.

Parity contract: with no hooks, :class:`SiglipVisionRunner` returns ``get_image_features``'s
``pooler_output`` (attention-pooling head over ``post_layernorm`` of the tokens) and
:class:`SiglipTextRunner` returns ``get_text_features``'s (``head`` of the last position after
``final_layer_norm``); tests check 1e-5 in fp32. The runners read the library modules' weights;
attention, the pooling head's included, goes through ``vlm.kernels.attention``.

The pooling head is computed from its own weights with a key mask: its probe attends to the
tower's own tokens only (type PATCH, not padding), never to prompt tokens a hook inserted.

The text tower attends bidirectionally to every position, padding included (SigLIP is trained
with text padded to ``max_length`` and no mask), and pools the last position, so nothing can be
trimmed: the runner always runs the full context.

SigLIP 2 takes patchified pixels, a pixel mask and ``spatial_shapes`` (NaFlex: any aspect ratio
and patch count). The runner gives it square ``[B, 3, S, S]`` images with
``S = sqrt(num_patches) * patch_size`` as one full grid of patches (what its processor makes of a
square image); other resolutions are not run.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.kernels import AttnSpec, attention
from vlm.tokens import TokenState, TokenType, kept_first
from vlm.towers.blocks import merge_heads, split_heads
from vlm.towers.hf_clip_text import check_length
from vlm.towers.hf_clip_vision import HFClipBlock
from vlm.towers.runner import TextRunner, TowerOutput, TowerPass, last_original


def unwrap(model: nn.Module, inner: str) -> nn.Module:
    """transformers 4.x wraps the tower (``SiglipVisionModel.vision_model``); 5.x does not."""
    return getattr(model, inner) if isinstance(getattr(model, inner, None), nn.Module) else model


def attention_pool(head: nn.Module, x: Tensor, own: Tensor) -> Tensor:
    """``SiglipMultiheadAttentionPoolingHead`` on ``x [B, N, D]`` with keys restricted to
    ``own [B, N]``: probe attention, then ``+ mlp(layernorm(.))``. Own tokens are moved first (a
    stable reorder; attention does not depend on key order) so the mask is a key length."""
    mha: nn.MultiheadAttention = head.attention
    b, n, d = x.shape
    x = torch.gather(x, 1, kept_first(own, n)[..., None].expand(b, n, d))
    spec = AttnSpec(k_lengths=own.sum(1))
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    probe = head.probe.to(x.dtype).expand(b, -1, -1)
    q = split_heads(nn.functional.linear(probe, w_q, b_q), mha.num_heads)
    k = split_heads(nn.functional.linear(x, w_k, b_k), mha.num_heads)
    v = split_heads(nn.functional.linear(x, w_v, b_v), mha.num_heads)
    h = mha.out_proj(merge_heads(attention(q, k, v, spec).out))
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


class SiglipVisionRunner:
    """patch embeddings + positions (no CLS) -> hooks start -> blocks -> ``post_layernorm`` ->
    attention-pooling ``head`` over the tower's own tokens."""

    tower = Tower.VISION

    def __init__(self, vision_model: nn.Module) -> None:
        vision_model = unwrap(vision_model, "vision_model")
        if not hasattr(vision_model, "post_layernorm") or not hasattr(getattr(vision_model, "encoder", None), "layers"):
            raise TypeError(f"{type(vision_model).__name__} is not a transformers SigLIP vision tower "
                            "(embeddings, encoder.layers, post_layernorm).")
        if getattr(vision_model, "head", None) is None:
            raise TypeError("This SigLIP vision tower has no pooling head (vision_use_head=False), so it has no "
                            "image embedding; use a SiglipModel whose vision config has vision_use_head=True.")
        self.model = vision_model
        cfg = vision_model.config
        self.blocks = [HFClipBlock(layer) for layer in vision_model.encoder.layers]
        self.num_layers = len(self.blocks)
        self.width = int(cfg.hidden_size)
        self.heads = self.blocks[0].heads
        self.patch_size = int(cfg.patch_size)
        self.naflex = isinstance(vision_model.embeddings.patch_embedding, nn.Linear)  # SigLIP 2
        if self.naflex:
            side = math.isqrt(int(cfg.num_patches))
            if side * side != int(cfg.num_patches):
                raise TypeError(f"SigLIP 2 with num_patches={cfg.num_patches} (not a square) has no square input "
                                "size; the runner feeds one full square grid of patches.")
            self.grid = side
        else:
            self.grid = int(cfg.image_size) // self.patch_size
        self.image_size = self.grid * self.patch_size

    def patchify(self, images: Tensor) -> Tensor:
        """``[B, C, S, S] -> [B, grid * grid, p * p * C]`` in SigLIP 2's processor order
        (patches row by row, pixels row by row, channels last)."""
        b, c, _, _ = images.shape
        g, p = self.grid, self.patch_size
        return images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)

    def embed(self, images: Tensor) -> TokenState:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"The SigLIP vision tower takes {self.image_size}x{self.image_size} images; got "
                             f"{tuple(images.shape[-2:])}. Resize the data to {self.image_size} px.")
        emb = self.model.embeddings
        images = images.to(emb.patch_embedding.weight.dtype)
        if self.naflex:
            shapes = torch.tensor([[self.grid, self.grid]], device=images.device).expand(images.shape[0], 2)
            x = emb(self.patchify(images), shapes)
        else:
            x = emb(images)
        types = torch.full((x.shape[1],), int(TokenType.PATCH), dtype=torch.int8, device=x.device)
        return TokenState.create(x, types)

    def pool(self, state: TokenState) -> Tensor:
        """The pooling head on ``post_layernorm`` of the state, keys = the valid PATCH tokens."""
        x = self.model.post_layernorm(state.x)
        return attention_pool(self.model.head, x, state.type_mask(TokenType.PATCH))

    def __call__(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        run = TowerPass(self.tower, self.blocks, hooks)
        state = run.run(run.start(self.embed(images)))
        return TowerOutput(self.pool(state), state)


class SiglipTextRunner(TextRunner):
    """Bidirectional text tower: token + position embeddings -> blocks -> ``final_layer_norm`` ->
    the last position -> ``head``.

    ``embeds`` (``[B, L, D]``) replace ``token_embedding(tokens)``. Token types come from the
    tokenizer's ids: SOS at 0 where the row starts with ``bos_id`` (SigLIP's tokenizer adds none),
    EOT at the first ``eos_id``, PAD after it, TEXT else. Pooling reads the last position of the
    tokenized sequence (an EOS or padding) by position, not type. ``trim`` is always off (see the module).
    """

    trim = False

    def __init__(self, text_model: nn.Module, bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> None:
        text_model = unwrap(text_model, "text_model")
        if not hasattr(text_model, "final_layer_norm") or not isinstance(getattr(text_model, "head", None), nn.Linear):
            raise TypeError(f"{type(text_model).__name__} is not a transformers SigLIP text tower "
                            "(embeddings, encoder.layers, final_layer_norm, head).")
        self.model = text_model
        self.blocks = [HFClipBlock(layer) for layer in text_model.encoder.layers]
        self.num_layers = len(self.blocks)
        self.width = int(text_model.config.hidden_size)
        self.heads = self.blocks[0].heads
        self.bos_id, self.eos_id = bos_id, eos_id

    @property
    def token_embedding(self) -> nn.Module:
        return self.model.embeddings.token_embedding

    @property
    def context_length(self) -> int:
        return int(self.model.embeddings.position_embedding.weight.shape[0])

    def token_types(self, tokens: Tensor) -> Tensor:
        """SOS at 0 where the row starts with ``bos_id``, EOT at the first ``eos_id`` (else the last
        position), PAD after it, TEXT else, as open_clip's SigLIP text runner types them
        (``vlm.towers.clip``). Pooling reads the last position by position, not type."""
        b, n = tokens.shape
        types = torch.full((b, n), int(TokenType.TEXT), dtype=torch.int8, device=tokens.device)
        if self.bos_id is not None:
            types[:, 0] = torch.where(tokens[:, 0] == self.bos_id, int(TokenType.SOS), int(TokenType.TEXT))
        pos = torch.arange(n, device=tokens.device)[None]
        is_eos = tokens == (-1 if self.eos_id is None else self.eos_id)
        eot = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), n - 1)[:, None]
        types = torch.where(pos == eot, torch.full_like(types, int(TokenType.EOT)), types)
        return torch.where(pos > eot, torch.full_like(types, int(TokenType.PAD)), types)

    def prefix_length(self, tokens: Tensor) -> Optional[int]:
        """None: every position reaches the pooled last one (no mask), so none may be cut."""
        return None

    def embed(self, tokens: Tensor, embeds: Optional[Tensor] = None) -> TokenState:
        emb = self.model.embeddings
        n = tokens.shape[1]
        check_length(n, self.context_length, "SigLIP text tower")
        x = emb.token_embedding(tokens) if embeds is None else embeds
        x = x + emb.position_embedding(emb.position_ids[:, :n]).to(x.dtype)
        return TokenState.create(x, self.token_types(tokens))

    def pool(self, state: TokenState, project: bool = True) -> Tensor:
        """The state of the last tokenized position (wherever hooks moved it), after the final norm."""
        pooled = last_original(self.model.final_layer_norm(state.x), state)
        return self.project(pooled) if project else pooled

    def project(self, pooled: Tensor) -> Tensor:
        """The text ``head`` (kept separate so frozen pooled features can be cached)."""
        return self.model.head(pooled)

