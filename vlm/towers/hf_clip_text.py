"""Hugging Face ``CLIPModel`` run block by block as an image-text backbone: the causal text tower
(``CLIPTextModel``) and the image tower up to the joint embedding.

Parity contract: with no hooks, :class:`HFClipTextRunner` returns ``CLIPModel.get_text_features``
(``text_projection`` of the pooled EOS state) and :class:`HFClipImageRunner` returns
``get_image_features`` (``visual_projection`` of ``post_layernorm(CLS)``); tests check 1e-5 in fp32.
The runners read the library modules' weights; attention goes through ``vlm.kernels.attention``.

Pooling reads the EOS state as transformers does: the largest token id for legacy configs with
``eos_token_id == 2``, else the first ``eos_token_id``. Both hold for the HF tokenizer (pads with
EOS) and open_clip's (pads with 0). Under the causal mask nothing after EOS reaches EOS, so the
text tower runs only up to the batch's last EOS (``trim``, exact; ``vlm.towers.runner.trim_text``).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.tokens import TokenState, TokenType
from vlm.towers.hf_clip_vision import HFClipBlock
from vlm.towers.runner import TextRunner, TowerOutput, TowerPass

#: ``eos_token_id`` of CLIP configs written before transformers PR #24773: pool at the largest id.
LEGACY_EOS_ID = 2


def check_length(n: int, limit: int, who: str) -> None:
    """Refuse a sequence longer than the position table (instead of an index error)."""
    if n > limit:
        raise ValueError(f"{who}: {n} text positions exceed the model's {limit} position embeddings; "
                         f"tokenize with context length <= {limit}.")


class HFClipImageRunner:
    """embeddings (CLS + patches + positions) -> hooks start -> ``pre_layrnorm`` -> blocks ->
    ``post_layernorm`` of CLS -> ``visual_projection``.

    ``on_tower_start`` hooks see the tokens before ``pre_layrnorm``, where open_clip's runner
    shows them before ``ln_pre`` (prompts appended there are normalised with the patches)."""

    tower = Tower.VISION

    def __init__(self, vision_model: nn.Module, projection: nn.Module) -> None:
        if hasattr(vision_model, "vision_model"):  # transformers 4.x: CLIPVisionModel wraps the transformer
            vision_model = vision_model.vision_model
        if not hasattr(vision_model, "pre_layrnorm") or not hasattr(vision_model, "post_layernorm"):
            raise TypeError(f"{type(vision_model).__name__} is not a transformers CLIP vision tower "
                            "(embeddings, pre_layrnorm, encoder, post_layernorm).")
        self.model = vision_model
        self.projection = projection
        self.blocks = [HFClipBlock(layer) for layer in vision_model.encoder.layers]
        self.num_layers = len(self.blocks)
        self.width = int(vision_model.config.hidden_size)
        self.heads = self.blocks[0].heads
        self.image_size = int(vision_model.config.image_size)
        self.patch_size = int(vision_model.config.patch_size)

    def embed(self, images: Tensor) -> TokenState:
        emb = self.model.embeddings
        x = emb(images.to(emb.patch_embedding.weight.dtype))  # raises on another image size
        types = torch.full((x.shape[1],), int(TokenType.PATCH), dtype=torch.int8, device=x.device)
        types[0] = int(TokenType.CLS)
        return TokenState.create(x, types)

    def pool(self, state: TokenState, project: bool = True) -> Tensor:
        pooled = self.model.post_layernorm(state.first_of_type(TokenType.CLS))
        return self.projection(pooled) if project else pooled

    def dense_features(self, tokens: Tensor) -> Tensor:
        """Per-token features in the joint space (``post_layernorm`` then ``visual_projection``, as
        the pooled CLS gets them) of last-block tokens ``[..., width]``."""
        return self.projection(self.model.post_layernorm(tokens))

    def __call__(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        run = TowerPass(self.tower, self.blocks, hooks)
        state = run.start(self.embed(images))
        state = run.run(state.replace(x=self.model.pre_layrnorm(state.x)))
        return TowerOutput(self.pool(state), state)


class HFClipTextRunner(TextRunner):
    """transformers' CLIP text tower: token + position embeddings -> causal blocks ->
    ``final_layer_norm`` -> EOS state -> ``text_projection`` (a ``CLIPModel`` module, passed in).

    ``embeds`` (``[B, L, D]`` token embeddings, before the position embedding) replace
    ``token_embedding(tokens)``, so prompt learners can splice learned context; the token ids still
    decide types and pooling. ``trim``: run only up to the batch's last EOS (see ``prefix_length``).
    """

    def __init__(self, text_model: nn.Module, projection: Optional[nn.Module] = None, trim: bool = True) -> None:
        if hasattr(text_model, "text_model"):  # transformers 4.x: CLIPTextModel wraps CLIPTextTransformer
            text_model = text_model.text_model
        if not hasattr(text_model, "final_layer_norm") or not hasattr(getattr(text_model, "encoder", None), "layers"):
            raise TypeError(f"{type(text_model).__name__} is not a transformers CLIP text tower "
                            "(embeddings, encoder.layers, final_layer_norm).")
        self.model = text_model
        self.projection = projection
        self.blocks = [HFClipBlock(layer) for layer in text_model.encoder.layers]
        self.num_layers = len(self.blocks)
        self.width = int(text_model.config.hidden_size)
        self.heads = self.blocks[0].heads
        self.eos_id = int(text_model.config.eos_token_id)
        self.pool_type = "argmax" if self.eos_id == LEGACY_EOS_ID else "eos"
        self.causal = True
        self.trim = trim

    @property
    def token_embedding(self) -> nn.Module:
        return self.model.embeddings.token_embedding

    @property
    def context_length(self) -> int:
        return int(self.model.embeddings.position_embedding.weight.shape[0])

    def eos_index(self, tokens: Tensor) -> Tensor:
        """``[B, 1]`` the pooled position: the largest id (legacy) or the first ``eos_token_id``
        (position 0 when a row has none, as transformers' argmax gives)."""
        if self.pool_type == "argmax":
            return tokens.argmax(-1, keepdim=True)
        return (tokens == self.eos_id).int().argmax(-1, keepdim=True)

    def token_types(self, tokens: Tensor) -> Tensor:
        """SOS at 0, EOT at the pooled position, PAD after it, TEXT else."""
        b, n = tokens.shape
        pos = torch.arange(n, device=tokens.device)[None]
        eot = self.eos_index(tokens)
        types = torch.full((b, n), int(TokenType.TEXT), dtype=torch.int8, device=tokens.device)
        types[:, 0] = int(TokenType.SOS)
        types = torch.where(pos == eot, torch.full_like(types, int(TokenType.EOT)), types)
        return torch.where(pos > eot, torch.full_like(types, int(TokenType.PAD)), types)

    def prefix_length(self, tokens: Tensor) -> Optional[int]:
        """Last EOS position of the batch + 1: under the causal mask no later token reaches an EOS."""
        return int(self.eos_index(tokens).amax()) + 1

    def embed(self, tokens: Tensor, embeds: Optional[Tensor] = None) -> TokenState:
        emb = self.model.embeddings
        n = tokens.shape[1]
        check_length(n, self.context_length, "CLIP text tower")
        x = emb.token_embedding(tokens) if embeds is None else embeds
        x = x + emb.position_embedding(emb.position_ids[:, :n]).to(x.dtype)
        return TokenState.create(x, self.token_types(tokens))

    def pool(self, state: TokenState, project: bool = True) -> Tensor:
        x = self.model.final_layer_norm(state.x)
        pooled = state.replace(x=x).first_of_type(TokenType.EOT)
        return self.project(pooled) if project else pooled

    def project(self, pooled: Tensor) -> Tensor:
        """``text_projection`` (kept separate so frozen pooled features can be cached)."""
        return pooled if self.projection is None else self.projection(pooled)

