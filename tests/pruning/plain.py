"""Independent plain implementations of the pruners' formulas for one image, on explicit attention
matrices. They share no code with ``vlm.pruning``: each HF CLIP block runs through transformers'
own layer forward, and the attention probabilities are formed literally as softmax(q k^T * scale)."""

from __future__ import annotations

import math
from typing import Callable

import torch


def run_plain(vision_model, pixel: torch.Tensor, n_blocks: int, cut: Callable) -> list[int]:
    """Run one image ``[3, H, W]`` through ``n_blocks`` blocks. After block l, ``cut(l, A, v, ids)``
    (explicit attention ``A [H, N, N]``, values ``v [H, N, d]``, original sequence index of each
    current token) returns the list of current indices to keep. Returns the kept patch indices."""
    vm = vision_model
    h = vm.pre_layrnorm(vm.embeddings(pixel[None]))[0]
    ids = list(range(h.shape[0]))
    for layer_idx in range(n_blocks):
        layer = vm.encoder.layers[layer_idx]
        at = layer.self_attn
        n, heads, d = h.shape[0], at.num_heads, at.head_dim
        xn = layer.layer_norm1(h)
        q = at.q_proj(xn).view(n, heads, d).transpose(0, 1)
        k = at.k_proj(xn).view(n, heads, d).transpose(0, 1)
        v = at.v_proj(xn).view(n, heads, d).transpose(0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) * at.scale, dim=-1)
        h = layer(h[None], None)[0]
        keep = cut(layer_idx, attn, v, ids)
        h = h[keep]
        ids = [ids[i] for i in keep]
    return [i - 1 for i in ids if i != 0]


def top_sorted(scores: list[float], candidates: list[int], count: int) -> list[int]:
    """The ``count`` best candidates (ties: earlier first), returned in increasing order."""
    best = sorted(candidates, key=lambda i: (-scores[i], i))[:count]
    return sorted(best)


def vtc_cls_cut(start: int, prune: int, budget: int) -> Callable:
    """S_j = sum_{l=start}^{prune} mean_h A^l[h, 0, j]; keep CLS + top ``budget`` patches at ``prune``."""
    acc: dict[int, float] = {}

    def cut(layer, attn, v, ids):
        n = attn.shape[-1]
        if start <= layer <= prune:
            row = attn[:, 0, :].mean(0)
            for j in range(n):
                acc[j] = acc.get(j, 0.0) + float(row[j])
        if layer != prune:
            return list(range(n))
        return [0] + top_sorted([acc[j] for j in range(n)], list(range(1, n)), budget)

    return cut


def flowcut_cut(n_blocks: int, budget: int, ema: float = 0.5) -> Callable:
    """FlowCut's ViT stage as the paper's code computes it, for one image (no batch max)."""
    cum: list[float] = []

    def cut(layer, attn, v, ids):
        nonlocal cum
        n = attn.shape[-1]
        rpl = n_blocks - 2 - layer
        if rpl < 0:
            return list(range(n))
        patches = list(range(1, n))
        a = [float(attn[:, 0, j].mean()) for j in range(n)]
        heads = v.shape[0]
        m = [0.0] * n
        for hh in range(heads):
            logits = [float(v[hh, 0] @ v[hh, j]) for j in range(n)]
            mx = max(logits)
            e = [math.exp(x - mx) for x in logits]
            z = sum(e)
            for j in range(n):
                m[j] += e[j] / z / heads
        vbar = v.mean(0)
        dens = [float(vbar[j].abs().sum()) for j in range(n)]
        sa = sum(a[j] for j in patches)
        sm = sum(m[j] for j in patches)
        s = [0.0] + [(a[j] / sa + m[j] / sm) * dens[j] for j in patches]
        cum = s if not cum else [ema * c + (1 - ema) * x for c, x in zip(cum, s)]
        if rpl % 2:
            return list(range(n))
        npatch = len(patches)
        if npatch <= budget:
            drop = 0
        elif rpl == 0:
            drop = npatch - budget
        else:
            p = [a[j] / sa for j in patches]
            ent = -sum(x * math.log(x) for x in p if x > 0)
            rho = ent / math.log(npatch)
            drop = round((npatch - budget) / math.sqrt(rpl) * (1 - rho**2))
        size = max(npatch - drop, budget)
        keep = [0] + top_sorted(cum, patches, size)
        cum = [cum[i] for i in keep]
        return keep

    return cut


def cls_attention_cut(layer_at: int, budget: int) -> Callable:
    def cut(layer, attn, v, ids):
        n = attn.shape[-1]
        if layer != layer_at:
            return list(range(n))
        row = attn[:, 0, :].mean(0).tolist()
        return [0] + top_sorted(row, list(range(1, n)), budget)

    return cut
