"""Test-only vision hooks for the Qwen towers: a whole-unit keep set cut through the pass, and a
probe recorder."""

from __future__ import annotations

import torch
from vlm.pruning.base import TokenPruner

from vlm.context import Tower
from vlm.hooks import TowerHook


class KeepUnits(TowerHook):
    """After block ``layer``, keep the merge units ``keep[i]`` (unit indices in raster order) of image
    row ``i``: each unit's ``m2`` patches get one score (1 kept, 0 dropped) and
    ``TokenPruner.keep_top`` keeps ``m2 * len(keep[i])`` patches, so whole units survive (stable ties)."""

    towers = (Tower.VISION,)

    def __init__(self, keep: list[list[int]], m2: int = 4, layer: int = -1) -> None:
        super().__init__()
        self.keep = [sorted(k) for k in keep]
        self.m2 = m2
        self.layer = layer

    def after_block(self, ctx, state, attn):
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        units = state.positions // self.m2
        width = int(units.max()) + 1
        wanted = torch.zeros(len(self.keep), width, dtype=torch.bool)
        for i, k in enumerate(self.keep):
            wanted[i, [u for u in k if u < width]] = True
        scores = torch.gather(wanted, 1, units).float()
        count = torch.tensor([len(k) * self.m2 for k in self.keep])
        state, _ = TokenPruner.keep_top(state, scores, count)
        return state


class ProbeRecorder(TowerHook):
    """Asks for probe rows ``rows`` in block ``layer`` and records, for that block, what came back
    (``probes [B, H, P, N]``) and an explicit reference from the block's own projections
    (``block.qkv(block.attn_input(x))``): softmax over each row's valid keys."""

    towers = (Tower.VISION,)

    def __init__(self, layer: int, rows: list[int]) -> None:
        super().__init__()
        self.layer, self.rows = layer, torch.tensor(rows)
        self.probes = self.reference = None

    def attention_spec(self, ctx, state, spec):
        if ctx.layer != self.layer:
            return spec
        q, k, _ = ctx.block.qkv(ctx.block.attn_input(state.x))
        logits = (q[:, :, self.rows] @ k.transpose(-1, -2)) * ctx.block.scale
        logits = logits.masked_fill(~state.valid_mask()[:, None, None, :], float("-inf"))
        self.reference = logits.softmax(-1)
        return self.request_probe(ctx, state, spec, self.rows)

    def after_block(self, ctx, state, attn):
        if ctx.layer == self.layer:
            self.probes = self.read_probe(ctx, attn)
        return state
