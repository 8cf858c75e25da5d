"""Plain deep vision-language prompting on open_clip / HF modules, written from MaPLe Eq. 4-7.

Used by the IVLP, MaPLe and DPL tests as the independent reference: nothing here calls a learner's
methods; prompts are passed in as plain per-layer lists (``None`` = keep the tokens).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

Prompts = Sequence[Optional[Tensor]]
#: ``block(i, x) -> x``: how to run resblock i (default: the library block itself).
BlockFn = Callable[[int, Tensor], Tensor]


def prompt_tokens(bb, classnames: list[str], prefix: str) -> Tensor:
    """Token ids of ``"<prefix> <class>."`` (MaPLe/IVLP prompt text)."""
    return bb.tokenizer([f"{prefix} {c.replace('_', ' ')}." for c in classnames])


def clip_text(bb, tokens: Tensor, prompts: Prompts, block: Optional[BlockFn] = None) -> Tensor:
    """CLIP text tower: word embeddings with slots 1..b replaced by ``prompts[0]`` (Eq. 4), block i
    preceded by replacing slots 1..b with ``prompts[i]`` (Eq. 5), ln_final, EOT, projection."""
    m = bb.model
    x = m.token_embedding(tokens).clone()
    n = prompts[0].shape[0]
    x[:, 1 : 1 + n] = prompts[0]
    x = x + m.positional_embedding[: x.shape[1]]
    for i, blk in enumerate(m.transformer.resblocks):
        if i > 0 and i < len(prompts) and prompts[i] is not None:
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x = block(i, x) if block is not None else blk(x, attn_mask=m.attn_mask[: x.shape[1], : x.shape[1]])
    x = m.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ m.text_projection


def clip_vision(bb, images: Tensor, prompts: Prompts, block: Optional[BlockFn] = None) -> Tensor:
    """CLIP image tower: ``[CLS, patches] + pos``, ``prompts[0]`` appended, ln_pre (Eq. 6); block i
    preceded by replacing the last v tokens with ``prompts[i]`` (Eq. 7); ln_post(CLS) @ proj."""
    v = bb.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    if prompts and prompts[0] is not None:
        x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, blk in enumerate(v.transformer.resblocks):
        if i > 0 and i < len(prompts) and prompts[i] is not None:
            p = prompts[i]
            x = torch.cat([x[:, : -p.shape[0]], p.expand(x.shape[0], -1, -1)], dim=1)
        x = block(i, x) if block is not None else blk(x)
    return v.ln_post(x[:, 0]) @ v.proj


def hf_text(bb, tokens: Tensor, prompts: Prompts) -> Tensor:
    """open_clip HFTextEncoder (BERT, mean pooler, linear proj) with the same slot replacement."""
    enc = bb.model.text
    hf = enc.transformer
    words = hf.embeddings.word_embeddings(tokens).clone()
    n = prompts[0].shape[0]
    words[:, 1 : 1 + n] = prompts[0]
    x = hf.embeddings(inputs_embeds=words)
    valid = tokens != hf.config.pad_token_id
    additive = torch.zeros(valid.shape, dtype=x.dtype).masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
    for i, layer in enumerate(hf.encoder.layer):
        if i > 0 and i < len(prompts) and prompts[i] is not None:
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        out = layer(x, attention_mask=additive)
        x = out[0] if isinstance(out, tuple) else out
    w = valid.to(x.dtype).unsqueeze(-1)
    return enc.proj((x * w).sum(1) / w.sum(1))
