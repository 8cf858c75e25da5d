"""Every vision pruner on both Qwen towers (issue 25, item 2), against explicit attention.

Qwen's towers have no CLS token. The pruners' stand-in for the CLS row is the *global query*, the
mean of an image's queries (``AttnSpec.probe_mean_query``), as FlowCut's Qwen port computes it:
``a_j = mean_h softmax_k(q_bar_h . k_{h,k} * scale)_j`` over the image's tokens, in every block
(windowed blocks included). Scores act on what reaches the LLM: a 2x2 merge unit (four consecutive
patches, ``ctx.token_group``) scores the mean of its patches and is kept or dropped whole.

The references below recompute everything from the blocks' own projections on explicit
``[N, N]``-free but plain tensors (``ctx.block.qkv`` of the block input), per image, in Python
loops, and compare the kept units with what the runner kept.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.qwen.tiny import encode
from tests.registries import merge_unit_pruners, vision_pruners
from vlm import pruning
from vlm.context import Tower
from vlm.hooks import TowerHook
from vlm.pruning.registry import PRUNERS
from vlm.towers.qwen import QwenRunner

#: every registered vision-tower pruner (LLM-stage ones are covered where the LLM cut runs)
VISION_PRUNERS = merge_unit_pruners()  # the ones that need a CLS row or a patch grid are refused (tested below)
BUDGET = 3  # merged tokens per image; the four images have 15, 4, 16 and 12 units


class Recorder(TowerHook):
    """Before every block: the tokens' positions (patch index in the processor's order) and the
    explicit global-query weights ``a [B, N]`` and head-mean values ``[B, N, d]`` per image row."""

    towers = (Tower.VISION,)

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    def on_tower_start(self, ctx, state):
        self.records = []
        return state

    def attention_spec(self, ctx, state, spec):
        q, k, v = ctx.block.qkv(ctx.block.attn_input(state.x))  # [B, H, N, d], rotated as the block does
        rows = []
        for b in range(state.x.shape[0]):
            n = int(state.lengths[b]) if state.lengths is not None else state.x.shape[1]
            q_bar = q[b, :, :n].float().mean(1)  # [H, d]
            a = (torch.einsum("hd,hnd->hn", q_bar, k[b, :, :n].float()) * ctx.block.scale).softmax(-1).mean(0)
            rows.append(dict(pos=state.positions[b, :n].clone(), a=a, v=v[b, :, :n].float().mean(0)))
        self.records.append(rows)
        return spec


def top_units(unit_scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` best units (ties: the earlier), in order."""
    order = sorted(range(len(unit_scores)), key=lambda u: (-float(unit_scores[u]), u))
    return sorted(order[:count])


def unit_mean(per_token: torch.Tensor, g: int = 4) -> torch.Tensor:
    return per_token.view(-1, g).mean(1)


def kept_units(out, row: int) -> list[int]:
    return out.units[row, : int(out.counts[row])].tolist()


def raster_units(pos: torch.Tensor, groups: list[int], g: int = 4) -> list[int]:
    """The raster unit ids of token groups ``groups`` (Qwen2.5-VL's tokens are in window order)."""
    return sorted(int(pos[u * g]) // g for u in groups)


def run(model, hooks):
    enc = encode(model.config.model_type, "right")
    with torch.no_grad():
        return QwenRunner(model).vision.run(enc["pixel_values"], enc["image_grid_thw"], hooks)


@pytest.mark.parametrize("name", VISION_PRUNERS)
def test_every_vision_pruner_keeps_whole_units_within_the_budget(model, name):
    full = run(model, []).counts
    out = run(model, [pruning.create(name, num_tokens=BUDGET)])
    assert out.counts.tolist() == full.clamp(max=BUDGET).tolist()
    for row in range(len(out.counts)):
        units = kept_units(out, row)
        assert units == sorted(set(units)) and all(0 <= u < int(full[row]) for u in units)


def test_mean_query_probe_equals_the_explicit_global_query(model):
    """The weights the pruners read (``request_mean_probe``) equal the explicit computation in every
    block, windowed (Qwen2.5-VL) and full-attention alike."""

    class Both(Recorder):
        def __init__(self):
            super().__init__()
            self.read: list[torch.Tensor] = []

        def attention_spec(self, ctx, state, spec):
            spec = super().attention_spec(ctx, state, spec)
            return self.request_mean_probe(ctx, state, spec)

        def after_block(self, ctx, state, attn):
            self.read.append(self.read_probe(ctx, attn)[:, :, 0].mean(1))
            return state

    probe = Both()
    run(model, [probe])
    assert len(probe.read) == len(probe.records) == model.config.vision_config.depth
    for got, rows in zip(probe.read, probe.records):
        for b, r in enumerate(rows):
            n = r["a"].numel()
            torch.testing.assert_close(got[b, :n], r["a"], atol=1e-6, rtol=1e-5)
            assert float(got[b, n:].abs().sum()) == 0.0


def test_cls_attention_keeps_the_top_units_of_the_global_query(model):
    rec = Recorder()
    out = run(model, [rec, pruning.create("cls_attention", num_tokens=BUDGET)])
    for b, r in enumerate(rec.records[-1]):
        assert kept_units(out, b) == raster_units(r["pos"], top_units(unit_mean(r["a"]), BUDGET))


def test_vtc_cls_sums_the_global_query_over_its_window(model):
    depth = model.config.vision_config.depth
    rec = Recorder()
    out = run(model, [rec, pruning.create("vtc_cls", num_tokens=BUDGET, start_layer=-2)])
    for b in range(len(out.counts)):
        total = sum(rec.records[layer][b]["a"] for layer in (depth - 2, depth - 1))
        assert kept_units(out, b) == raster_units(rec.records[-1][b]["pos"], top_units(unit_mean(total), BUDGET))


def test_flowcut_follows_the_qwen_port_rule_on_merge_units(model):
    """FlowCut's Qwen port: S = a * ||mean_h v||_1, C = 0.5 C + 0.5 S, cuts where the blocks left
    (R - 1 - l) are even, entropy-adaptive counts, the last cut to T after the last block. Every cut
    the runner made is recomputed from the recorded block inputs and compared, then the final set."""
    depth = model.config.vision_config.depth
    target, ema, g = 2, 0.5, 4
    rec = Recorder()
    out = run(model, [rec, pruning.create("flowcut", num_tokens=target)])
    for b in range(len(out.counts)):
        cum: dict[int, float] = {}
        kept = None
        for layer in range(depth):
            r = rec.records[layer][b]
            pos = r["pos"].tolist()
            if kept is not None:
                assert pos == kept, f"image {b}: tokens before block {layer} are not the reference's cut"
            rpl = depth - 1 - layer
            score = r["a"] * r["v"].abs().sum(-1)
            c = score if not cum else torch.tensor([ema * cum[p] for p in pos]) + (1 - ema) * score
            cum = dict(zip(pos, c.tolist()))
            kept = pos
            if rpl % 2 == 0:
                n = len(pos)
                excess = max(n // g - target, 0)
                if rpl == 0:
                    drop = excess
                elif excess > 0:
                    p = r["a"] / r["a"].sum()
                    rho = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(max(n, 2))
                    drop = int(torch.round(torch.tensor(excess / math.sqrt(rpl) * (1 - rho**2))))
                else:
                    drop = 0
                count = min(max(n // g - drop, target), n // g)
                units = top_units(unit_mean(c), count)
                kept = [pos[u * g + j] for u in units for j in range(g)]
        assert kept_units(out, b) == sorted(p // g for p in kept[::g])


@pytest.mark.parametrize("name", VISION_PRUNERS)
def test_an_image_keeps_the_same_units_alone_as_in_the_batch(model, name):
    enc = encode(model.config.model_type, "right")
    runner = QwenRunner(model)
    with torch.no_grad():
        together = runner.vision.run(enc["pixel_values"], enc["image_grid_thw"], [pruning.create(name, num_tokens=BUDGET)])
        start = 0
        for row, grid in enumerate(enc["image_grid_thw"]):
            n = int(grid.prod())
            alone = runner.vision.run(enc["pixel_values"][start : start + n], grid[None], [pruning.create(name, num_tokens=BUDGET)])
            start += n
            assert kept_units(alone, 0) == kept_units(together, row)


@pytest.mark.parametrize("name", sorted(set(vision_pruners()) - set(merge_unit_pruners())))
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_a_pruner_that_needs_cls_or_a_grid_is_refused_when_the_model_is_built(kind, name):
    """A vision pruner that declares ``runs_on_merge_units = False`` is refused by the Qwen backbone's
    build-time check (what ``LlavaEval`` calls), with the usable pruners named; alone and as an LLM
    stage's vision stage."""
    from tests.qwen.tiny import MODELS
    from vlm.backbones import Qwen2_5VLBackbone, Qwen3VLBackbone
    from vlm.runtime.reliability import IncompatibleHooksError

    backbone = {"qwen2_5_vl": Qwen2_5VLBackbone, "qwen3_vl": Qwen3VLBackbone}[kind](config=MODELS[kind][0])
    with pytest.raises(IncompatibleHooksError, match=f"Pruner '{name}' needs a vision tower with a CLS token.*vtc_cls"):
        backbone.check_budget(pruning.create(name, num_tokens=BUDGET))
    stage = next(pruning.create(n, num_tokens=BUDGET) for n in pruning.available() if Tower.LLM in PRUNERS.get(n).towers)
    stage.vision_stage = pruning.create(name, num_tokens=BUDGET)
    with pytest.raises(IncompatibleHooksError, match=f"Pruner '{name}'"):
        backbone.check_budget(stage)
