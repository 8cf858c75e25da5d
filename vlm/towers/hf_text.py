"""open_clip's ``HFTextEncoder`` (a Hugging Face BERT-family encoder) run block by block.

Used by CLIPs whose text tower is a pretrained HF model (``text_cfg.hf_model_name``), such as the
offline quickstart's frozen all-MiniLM-L6-v2. With no hooks, the output equals
``HFTextEncoder.forward`` (mean/CLS pooling, then ``proj``). The encoder runs only up to the
batch's longest prompt (``trim``): padding is masked out of every key set and of the mean, so the
padded positions change nothing that is pooled.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vlm.tokens import TokenState, TokenType
from vlm.towers.blocks import BertBlock
from vlm.tokens import masked_mean
from vlm.towers.runner import TextRunner


class HFTextRunner(TextRunner):
    """Bidirectional HF text encoder with key padding from ``pad_token_id`` (valid tokens first).
    ``trim``: run only the positions up to the batch's longest prompt (see ``prefix_length``)."""

    def __init__(self, encoder: nn.Module, trim: bool = True) -> None:
        hf = encoder.transformer
        if not hasattr(hf, "embeddings") or not hasattr(getattr(hf, "encoder", None), "layer"):
            raise TypeError(f"{type(hf).__name__} is not a BERT-family encoder (embeddings + encoder.layer).")
        self.encoder = encoder
        self.hf = hf
        self.blocks = [BertBlock(layer) for layer in hf.encoder.layer]
        self.width = hf.config.hidden_size
        self.num_layers = len(self.blocks)
        self.heads = self.blocks[0].heads
        self.pad_id = hf.config.pad_token_id
        self.trim = trim
        self.pooler = type(encoder.pooler).__name__
        if self.pooler not in ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler"):
            raise TypeError(f"HF text pooler {self.pooler} is not supported (mean or CLS pooling).")

    @property
    def token_embedding(self) -> nn.Module:
        return self.hf.embeddings.word_embeddings

    def token_types(self, tokens: Tensor) -> Tensor:
        """CLS-like first token as SOS, padding as PAD, the last valid token as EOT, TEXT else."""
        valid = tokens != self.pad_id
        lengths = valid.sum(-1, keepdim=True)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        types = torch.full(tokens.shape, int(TokenType.TEXT), dtype=torch.int8, device=tokens.device)
        types[:, 0] = int(TokenType.SOS)
        types = torch.where(pos == lengths - 1, torch.full_like(types, int(TokenType.EOT)), types)
        return torch.where(valid, types, torch.full_like(types, int(TokenType.PAD)))

    def prefix_length(self, tokens: Tensor) -> Optional[int]:
        """Last non-padding position of the batch + 1: padded keys are masked in every block and
        padded rows are out of the pooled mean (CLS pooling reads position 0). ``None`` (keep all)
        without a padding id."""
        if self.pad_id is None:
            return None
        pos = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        return max(1, int(torch.where(tokens != self.pad_id, pos, 0).amax()))

    def embed(self, tokens: Tensor, embeds: Optional[Tensor] = None) -> TokenState:
        words = self.token_embedding(tokens) if embeds is None else embeds
        x = self.hf.embeddings(inputs_embeds=words)
        lengths = (tokens != self.pad_id).sum(-1)
        return TokenState.create(x, self.token_types(tokens), lengths=lengths)

    def pool(self, state: TokenState, project: bool = True) -> Tensor:
        if self.pooler == "MeanPooler":
            pooled = masked_mean(state.x, state.valid_mask())
        elif self.pooler == "ClsPooler" and getattr(self.encoder.pooler, "use_pooler_output", False) and getattr(
            self.hf, "pooler", None
        ) is not None:
            pooled = self.hf.pooler(state.x)
        else:
            pooled = state.x[:, 0]
        return self.project(pooled) if project else pooled

    def project(self, pooled: Tensor) -> Tensor:
        """The text projection (kept separate so frozen pooled features can be cached)."""
        return self.encoder.proj(pooled)

