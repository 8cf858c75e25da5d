"""A plain reimplementation of FlowCut's released LLaVA-NeXT (anyres) selection, written from
reading the official code (TungChintao/FlowCut @ a2ecd24: ``modeling_clip_flowcut.py``,
``utils_flowcut.py``, ``llava_arch.py``, ``modeling_llama_flowcut.py``) for one image (the
official evaluation runs batch size 1). It shares no code with ``vlm``: transformers' own CLIP and
Llama layers, attention formed literally, packing by boolean grids.

1. Vision stage: the image's crops (base view first) are one vision batch. Every block whose input
   has more than ``crop_budget + 1`` tokens scores the patches (CLS-row attention, CLS-value
   softmax, value L1 norm) into a 0.5/0.5 running score; at the blocks with an even number of
   remaining prune layers the crops are cut with **one** prune count for the whole batch (the
   maximum over crops of the entropy rule), so every crop keeps the same number of patches.
2. Packing: the base view's kept patches (raster order), then the sub-crops' kept patches scattered
   onto the tiled ``(r s) x (c s)`` grid, the unpad window applied to the boolean grid (the
   official ``int(h * scale)``), read row-major. **No ``image_newline``** for multi-crop images.
3. LLM stage: decoder layer ``layer``'s post-RoPE query of the last prompt token against the keys
   and values of the contiguous visual span; keep the top ``budget`` in order (all if fewer).

Each packed token is named by its ``(crop, patch)``: crop 0 is the base view, crop ``1 + i`` the
``i``-th sub-crop (row-major), patch its index in that crop's ``s x s`` grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Token = tuple[int, int]


def vision_stage(vision_model, crops: Tensor, n_blocks: int, crop_budget: int) -> tuple[list[list[int]], Tensor]:
    """Kept patch ids of every crop and the feature-layer states ``[C, 1 + K, D]`` (CLS first)."""
    vm = vision_model
    h = vm.pre_layrnorm(vm.embeddings(crops))
    c, n = h.shape[:2]
    ids = [list(range(n - 1)) for _ in range(c)]
    cum = None
    for layer_idx in range(n_blocks):
        layer = vm.encoder.layers[layer_idx]
        at = layer.self_attn
        heads, d = at.num_heads, at.head_dim
        xn = layer.layer_norm1(h)

        def split(t):
            return t.view(c, -1, heads, d).transpose(1, 2)

        q, k, v = split(at.q_proj(xn)), split(at.k_proj(xn)), split(at.v_proj(xn))
        attn = torch.softmax(q @ k.transpose(-1, -2) * at.scale, dim=-1)  # [C, H, N, N]
        h = layer(h, None)
        rpl = n_blocks - 2 - layer_idx  # the official select_layer - idx - 1
        n = h.shape[1]
        if n <= crop_budget + 1:
            continue
        rel = attn[:, :, 0, 1:].mean(1)  # [C, N-1]
        sem = torch.softmax(torch.einsum("chd,chnd->chn", v[:, :, 0], v), dim=-1).mean(1)[:, 1:]
        dens = v.mean(1)[:, 1:].abs().sum(-1)
        score = (rel / rel.sum(1, keepdim=True) + sem / sem.sum(1, keepdim=True)) * dens
        cum = score if cum is None else 0.5 * cum + 0.5 * score
        if rpl % 2:
            continue
        if rpl:
            p = rel / rel.sum(1, keepdim=True)
            rho = -(p * p.log()).sum(1) / math.log(n - 1)
            r = (n - 1 - crop_budget) / math.sqrt(rpl) * (1 - rho**2)
            prune = int(round(float(r.max())))  # one count for the whole vision batch
        else:
            prune = n
        size = max(n - prune, crop_budget + 1)
        new_h, new_cum = [], []
        for i in range(c):
            s = cum[i].tolist()
            keep = sorted(sorted(range(n - 1), key=lambda j: (-s[j], j))[: size - 1])
            new_h.append(torch.cat([h[i, :1], h[i, 1:][keep]]))
            new_cum.append(cum[i, keep])
            ids[i] = [ids[i][j] for j in keep]
        h, cum = torch.stack(new_h), torch.stack(new_cum)
    return ids, h


def unpad_window(rows: int, cols: int, height: int, width: int) -> list[list[bool]]:
    """The official ``unpad_mask`` on an all-True ``rows x cols`` grid for an image ``height x width``."""
    mask = [[True] * cols for _ in range(rows)]
    if width / height > cols / rows:
        pad = (rows - int(height * (cols / width))) // 2
        for r in list(range(pad)) + list(range(rows - pad, rows)):
            mask[r] = [False] * cols
    else:
        pad = (cols - int(width * (rows / height))) // 2
        for r in range(rows):
            for col in list(range(pad)) + list(range(cols - pad, cols)):
                mask[r][col] = False
    return mask


def pack(ids: list[list[int]], grid: tuple[int, int], side: int, size: tuple[int, int]) -> list[Token]:
    """The packed visual sequence as ``(crop, patch)`` names: base view, then the unpadded grid."""
    r, c = grid
    tokens: list[Token] = [(0, p) for p in sorted(ids[0])]
    window = unpad_window(r * side, c * side, *size)
    kept = [set(x) for x in ids[1:]]
    for row in range(r * side):
        for col in range(c * side):
            crop = (row // side) * c + col // side
            patch = (row % side) * side + col % side
            if window[row][col] and patch in kept[crop]:
                tokens.append((1 + crop, patch))
    return tokens


def features(projector, ids: list[list[int]], states: Tensor, tokens: list[Token]) -> Tensor:
    """Projected feature-layer states of ``tokens`` ``[len(tokens), D]``."""
    where = {(crop, p): (crop, 1 + j) for crop, x in enumerate(ids) for j, p in enumerate(x)}
    return torch.stack([projector(states[where[t][0], where[t][1]]) for t in tokens])


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def llm_stage(lm, embeds: Tensor, start: int, count: int, budget: int, layer: int = 1) -> list[int]:
    """Indices (into the visual span ``[start, start + count)``) that layer ``layer`` keeps."""
    if count <= budget:
        return list(range(count))
    pos = torch.arange(embeds.shape[0])
    hidden = lm(inputs_embeds=embeds[None], position_ids=pos[None], output_hidden_states=True).hidden_states[layer][0]
    block = lm.layers[layer]
    at = block.self_attn
    d = at.head_dim
    x = block.input_layernorm(hidden)
    q = at.q_proj(x).view(len(x), -1, d)
    k = at.k_proj(x).view(len(x), -1, d)
    v = at.v_proj(x).view(len(x), -1, d)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # repeat_kv
    cos, sin = (t[0, :, None] for t in lm.rotary_emb(x[None], pos[None]))
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    last = embeds.shape[0] - 1  # last_instruct_pos - 1
    span = slice(start, start + count)
    rel = torch.softmax(torch.einsum("hd,nhd->hn", q[last], k[span]) / math.sqrt(d), -1).mean(0)
    sem = torch.softmax(torch.einsum("hd,nhd->hn", v[last], v[span]) / math.sqrt(d), -1).mean(0)
    score = ((rel / rel.sum() + sem / sem.sum()) * v[span].mean(1).abs().sum(-1)).tolist()
    return sorted(sorted(range(count), key=lambda j: (-score[j], j))[:budget])


def select(model, crops: Tensor, size: tuple[int, int], grid: tuple[int, int], text: tuple[list[int], list[int]],
           budget: int, n_blocks: int) -> dict:
    """The whole official anyres recipe for one image and prompt (``text``: ids before and after the
    image). Returns the per-crop kept patches, the packed tokens the LLM receives and those it keeps."""
    inner = model.model
    vm = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    side = int(math.isqrt(vm.embeddings.num_patches))
    ids, states = vision_stage(vm, crops, n_blocks, budget // 2)
    tokens = pack(ids, grid, side, size)
    lm = inner.language_model
    emb = lm.get_input_embeddings()
    before, after = (emb(torch.tensor(t)) for t in text)
    embeds = torch.cat([before, features(inner.multi_modal_projector, ids, states, tokens), after])
    kept = llm_stage(lm, embeds, len(text[0]), len(tokens), budget)
    return dict(crops=ids, packed=tokens, kept=[tokens[j] for j in kept])
