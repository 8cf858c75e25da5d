"""``LlmStage.probe_fields``: the runner computes only the probe groups a stage declares, and that
changes nothing. For every registered LLM-stage pruner (the registry's list) on a tiny LLaVA-NeXT
(4 decoder layers), the cut and the logits with its declared groups equal those with every group,
and its probes carry exactly the declared groups (an undeclared one is None, so a pruner that reads
a group it did not declare fails in this test, not silently)."""

from __future__ import annotations

import pytest
import torch

from tests.llava.test_llm_cut import batch
from tests.llava.test_llava_next import SIZES
from tests.pruning.test_fastv_dart import llava, pixels  # noqa: F401  (fixtures: 4-layer LLaVA-NeXT, 3 images)
from tests.registries import llm_pruners
from vlm import pruning
from vlm.llm_stage import ALL_PROBE_FIELDS, LlmProbe, ProbeField
from vlm.towers.llava_next import LlavaNextRunner

BUDGET = 20
#: constructor arguments of the pruners whose default cut layers do not fit 4 decoder layers
FITS_FOUR_LAYERS = {
    "pyramiddrop": dict(layers=(1, 2, 3), ratios=(0.5, 0.25, 0.125)),
    "sparsevlm": dict(num_tokens=BUDGET, layers=(0, 1, 2), counts=(30, 24, BUDGET)),
}
#: the LlmProbe fields of each group
GROUPS = {
    ProbeField.VALUES: ("values", "query_value"),
    ProbeField.QUERY_LSE: ("query_lse",),
    ProbeField.HIDDEN: ("hidden",),
    ProbeField.STATES: ("states",),
    ProbeField.TEXT: ("text_keys", "text_hidden"),
    ProbeField.TEXT_ROWS: ("text_queries", "text_lse", "text_weights"),
    ProbeField.EMBEDS: ("embeds", "text_embeds"),
}


def make(name: str):
    return pruning.create(name, **FITS_FOUR_LAYERS.get(name, dict(num_tokens=BUDGET)))


def run(runner, pixels, pruner) -> tuple[torch.Tensor, object, list[LlmProbe]]:
    """Logits, the cut and the probe of every cut of one pass of ``pruner``."""
    probes: list[LlmProbe] = []
    keep_stage = pruner.keep_stage
    pruner.keep_stage = lambda probe, stage: probes.append(probe) or keep_stage(probe, stage)
    ids, mask = batch(runner, pixels, "right", [pruner])
    logits, inputs = runner(ids, pixels, mask, [pruner], image_sizes=SIZES)
    return logits, inputs.cut, probes


def test_every_group_is_named():
    assert set(GROUPS) == set(ProbeField)


@pytest.mark.parametrize("name", llm_pruners())
@torch.no_grad()
def test_declared_fields_change_nothing_and_are_all_a_probe_carries(llava, pixels, name):
    runner = LlavaNextRunner(llava)
    declared = make(name)
    assert declared.probe_fields < ALL_PROBE_FIELDS, f"{name} declares every probe group: list only those it reads"
    everything = make(name)
    everything.probe_fields = ALL_PROBE_FIELDS
    logits, cut, probes = run(runner, pixels, declared)
    logits_all, cut_all, probes_all = run(runner, pixels, everything)
    assert len(probes) == len(declared.cuts())
    assert torch.equal(cut.index, cut_all.index)
    assert cut.visual_counts.tolist() == cut_all.visual_counts.tolist()
    torch.testing.assert_close(logits, logits_all, atol=0.0, rtol=0.0)
    for probe, full in zip(probes, probes_all):
        for group, names in GROUPS.items():
            for field in names:
                assert getattr(full, field) is not None, field
                assert (getattr(probe, field) is not None) == (group in declared.probe_fields), (name, field)
        assert torch.equal(probe.keys, full.keys) and torch.equal(probe.query, full.query)


@torch.no_grad()
def test_a_merge_without_states_is_refused(llava, pixels):
    """A stage whose merge_stage returns merged tokens but whose probe carries no ``states``."""
    pruner = make("sparsevlm")
    pruner.probe_fields = pruner.probe_fields - {ProbeField.STATES}
    pruner.recycled = lambda probe, keep: (torch.ones(keep.shape[0], 1, keep.shape[1]) / keep.shape[1],
                                           torch.ones(keep.shape[0], dtype=torch.long))
    with pytest.raises(TypeError, match="ProbeField.STATES"):
        run(LlavaNextRunner(llava), pixels, pruner)
