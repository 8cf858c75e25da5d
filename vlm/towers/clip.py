"""open_clip CLIP towers run block by block: image tower, built-in text tower, and the backbone.

Parity contract: with no hooks, :meth:`ClipBackbone.encode_image` equals open_clip
``model.encode_image`` and :meth:`ClipBackbone.encode_text` equals ``model.encode_text`` (tests
check 1e-5 in fp32). The runners read the library modules' own weights; nothing is patched.

The causal text tower runs only up to the last EOT of the batch (``trim``, see
:func:`~vlm.towers.runner.trim_text`): nothing after EOT can reach EOT, so the pooled features
equal the full-context run, at a fraction of the cost for short prompts. A bidirectional text
tower (SigLIP's ``no_causal_mask``, pooling the last position) is never trimmed: every position
reaches the pooled one.

open_clip's timm-backed image towers (``TimmModel``: SigLIP, EVA02-CLIP) run through
:class:`~vlm.towers.open_clip_timm.OpenClipTimmVisionRunner`; :func:`vision_runner_for` picks.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from open_clip.timm_model import TimmModel
from torch import Tensor, nn

from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.tokens import TokenState, TokenType, masked_mean
from vlm.towers.blocks import OpenClipBlock
from vlm.towers.open_clip_timm import OpenClipTimmVisionRunner
from vlm.towers.runner import TextRunner, TowerOutput, TowerPass, last_original


class ClipVisionRunner:
    """open_clip ``VisionTransformer``: conv patches + CLS + positions -> hooks -> ln_pre -> blocks
    -> ln_post -> pool -> proj. ``on_tower_start`` hooks see the tokens before ``ln_pre`` (where
    deep vision-language prompt learners insert their first prompts)."""

    tower = Tower.VISION

    def __init__(self, visual: nn.Module) -> None:
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("open_clip vision towers with attentional pooling are not supported.")
        if not getattr(visual.transformer, "batch_first", True):
            raise TypeError("open_clip transformer with batch_first=False is not supported (open_clip<2.26).")
        self.visual = visual
        self.blocks = [OpenClipBlock(b) for b in visual.transformer.resblocks]
        self.width = visual.transformer.width
        self.num_layers = len(self.blocks)
        self.heads = self.blocks[0].heads

    def embed(self, images: Tensor) -> TokenState:
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        types = torch.full((x.shape[1],), int(TokenType.PATCH), dtype=torch.int8, device=x.device)
        types[0] = int(TokenType.CLS)
        state = TokenState.create(x, types)
        prob = float(getattr(v.patch_dropout, "prob", 0.0))
        if v.training and prob > 0:  # FLIP patch dropout: keep CLS and a random subset of patches
            b, n = x.shape[0], x.shape[1] - 1
            keep = max(1, int(n * (1 - prob)))
            idx = torch.randn(b, n, device=x.device).topk(keep, dim=-1).indices + 1
            state = state.select(torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1))
        return state

    def pool(self, state: TokenState) -> Tensor:
        v = self.visual
        x = state.x
        if not v.final_ln_after_pool:
            x = v.ln_post(x)
            state = state.replace(x=x)
        if v.pool_type == "tok":
            pooled = state.first_of_type(TokenType.CLS)
        elif v.pool_type == "avg":
            pooled = masked_mean(x, state.type_mask(TokenType.PATCH))
        else:
            raise TypeError(f"open_clip pool_type={v.pool_type!r} is not supported by the runner.")
        if v.final_ln_after_pool:
            pooled = v.ln_post(pooled)
        return pooled @ v.proj if v.proj is not None else pooled

    def dense_features(self, tokens: Tensor) -> Tensor:
        """Per-token features in the joint image-text space (``ln_post`` then ``proj``, as the pooled
        token gets them: MaskCLIP-style dense features) of last-block tokens ``[..., width]``."""
        x = self.visual.ln_post(tokens)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def __call__(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> TowerOutput:
        run = TowerPass(self.tower, self.blocks, hooks)
        state = run.start(self.embed(images))
        state = run.run(state.replace(x=self.visual.ln_pre(state.x)))
        return TowerOutput(self.pool(state), state)


class ClipTextRunner(TextRunner):
    """open_clip causal text transformer (CLIP's flattened text tower, or ``TextTransformer``).

    ``embeds`` (token embeddings before the positional embedding, ``[B, L, D]``) lets prompt
    prompt learners replace placeholder embeddings with learned context. ``trim``: run only
    the positions up to the batch's last EOT (exact under the causal mask; see ``prefix_length``).
    """

    def __init__(self, text: nn.Module, trim: bool = True, sos_id: Optional[int] = None,
                 end_id: Optional[int] = None) -> None:
        if getattr(text, "cls_emb", None) is not None:
            raise TypeError("open_clip text towers with a class embedding (CoCa) are not supported.")
        if getattr(text, "use_pad_mask", False):
            raise TypeError(
                "open_clip text towers with a padding mask (use_pad_mask=True) are not supported by the runner; "
                "build the TextTransformer with use_pad_mask=False (open_clip's configs never set it)."
            )
        self.text = text
        self.blocks = [OpenClipBlock(b) for b in text.transformer.resblocks]
        self.width = text.transformer.width
        self.num_layers = len(self.blocks)
        self.heads = self.blocks[0].heads
        self.pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        self.causal = getattr(text, "attn_mask", None) is not None
        self.eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
        #: the tokenizer's start and end ids (CLIP's SOT/EOT; SigLIP's tokenizer has no start id):
        #: with ``last`` pooling they place SOS and EOT (``token_types``)
        self.sos_id, self.end_id = sos_id, end_id
        self.trim = trim

    @property
    def token_embedding(self) -> nn.Module:
        return self.text.token_embedding

    def token_types(self, tokens: Tensor) -> Tensor:
        """SOS at 0, EOT where open_clip pools (argmax id, or ``eos_id``), PAD after, TEXT else.
        With ``last`` pooling (SigLIP: no mask, the last position is pooled by position, not type)
        EOT is the tokenizer's first end id (``end_id``; else the largest id) and position 0 is SOS
        only where it holds the tokenizer's start id (SigLIP's tokenizer has none)."""
        b, n = tokens.shape
        pos = torch.arange(n, device=tokens.device)[None]
        end = self.end_id if self.pool_type == "last" else (self.eos_id if self.pool_type == "eos" else None)
        if end is not None:
            is_end = tokens == end
            eot = torch.where(is_end.any(-1), is_end.int().argmax(-1), n - 1)[:, None]
        else:
            eot = tokens.argmax(-1, keepdim=True)
        types = torch.full((b, n), int(TokenType.TEXT), dtype=torch.int8, device=tokens.device)
        if self.pool_type != "last":
            types[:, 0] = int(TokenType.SOS)
        elif self.sos_id is not None:
            types[:, 0] = torch.where(tokens[:, 0] == self.sos_id, int(TokenType.SOS), int(TokenType.TEXT))
        types = torch.where(pos == eot, torch.full_like(types, int(TokenType.EOT)), types)
        return torch.where(pos > eot, torch.full_like(types, int(TokenType.PAD)), types)

    def prefix_length(self, tokens: Tensor) -> Optional[int]:
        """Last EOT position of the batch + 1: under the causal mask no later token reaches an EOT
        (or the first token). ``None`` (keep all) without a causal mask (every token reaches every
        other, e.g. SigLIP) or when pooling reads the last position (``last``) or every token."""
        if not self.causal or self.pool_type not in ("argmax", "eos", "first"):
            return None
        eot = self.token_types(tokens) == int(TokenType.EOT)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return int(torch.where(eot, pos, 0).amax()) + 1

    def embed(self, tokens: Tensor, embeds: Optional[Tensor] = None) -> TokenState:
        t = self.text
        cast = t.transformer.get_cast_dtype() if hasattr(t.transformer, "get_cast_dtype") else None
        x = t.token_embedding(tokens) if embeds is None else embeds
        if cast is not None:
            x = x.to(cast)
        x = x + t.positional_embedding[: x.shape[1]].to(x.dtype)
        return TokenState.create(x, self.token_types(tokens))

    def pool(self, state: TokenState, project: bool = True) -> Tensor:
        t = self.text
        x = t.ln_final(state.x)
        if self.pool_type == "last":  # the original last position (an end token or padding)
            pooled = last_original(x, state)
        elif self.pool_type in ("argmax", "eos"):
            pooled = state.replace(x=x).first_of_type(TokenType.EOT)
        elif self.pool_type == "first":
            pooled = x[:, 0]
        else:
            pooled = x
        return self.project(pooled) if project else pooled

    def project(self, pooled: Tensor) -> Tensor:
        """The text projection (kept separate so frozen pooled features can be cached)."""
        proj = self.text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj



def vision_runner_for(visual: nn.Module):
    """The right image runner for an open_clip ``model.visual``: its own ``VisionTransformer``
    (:class:`ClipVisionRunner`) or a timm-backed ``TimmModel`` (SigLIP, EVA02-CLIP;
    :class:`~vlm.towers.open_clip_timm.OpenClipTimmVisionRunner`)."""
    if isinstance(visual, TimmModel):
        return OpenClipTimmVisionRunner(visual)
    if not hasattr(visual, "transformer"):
        raise TypeError(
            f"open_clip image tower {type(visual).__name__} is not supported by the block-loop runners; use a ViT "
            "tower (open_clip VisionTransformer) or a timm-backed one (TimmModel: SigLIP, EVA02-CLIP)."
        )
    return ClipVisionRunner(visual)


def text_runner_for(model: nn.Module, trim: bool = True, sos_id: Optional[int] = None,
                    end_id: Optional[int] = None):
    """The right text runner for an open_clip model (built-in text tower or HF text encoder);
    ``trim``: run the text tower at the batch's longest prompt (exact, see ``trim_text``);
    ``sos_id``/``end_id``: the tokenizer's start and end ids, if it has them (:class:`ClipTextRunner`)."""
    text = getattr(model, "text", None)
    if text is None:
        return ClipTextRunner(model, trim, sos_id, end_id)
    if hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj"):
        from vlm.towers.hf_text import HFTextRunner

        return HFTextRunner(text, trim)
    return ClipTextRunner(text, trim, sos_id, end_id)
