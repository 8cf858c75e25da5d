"""Adding a method is one file (README "Extending", docs/design.md "Layout").

A throwaway pruner and a throwaway prompt learner are written as one module each into a temporary
folder, imported (their ``@register`` calls register them), and run through the generic suites the
shipped methods run through, by their registered names, with no edit to any repository file:

* the pruner (value-norm pruning: keep the patches whose attention values have the largest norm at
  one block, through ``AttnSpec.return_values``, ``ctx.resolve_layer``, a ``PassState`` and
  ``TokenPruner.keep_top``): its kept indices equal a plain computation of its rule on explicit
  values, image by image (tests/pruning/test_formulas.py), it keeps its budget in raster order, it
  runs beside other probing hooks unchanged (tests/pruning/test_shared_probes.py), and it composes
  in a LLaVA YAML config by ``class_path: <short name>`` through the CLI parser
  (tests/llava/test_configs.py);
* the learner (a shallow learned text context through ``vlm.prompts.text_context`` plus a few
  vision prompts after CLS): the text tower's trim to the longest prompt is exact for it, features
  and gradients, on both text towers (tests/towers/test_text_trim.py), it composes in a CLIP YAML
  config by its short name (tests/test_configs.py), and it is reachable by name
  (tests/prompts/test_registry.py);
* and both leave the registries as they found them.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.llava.test_configs import check_pruner_composes
from tests.prompts.test_registry import check_jsonargparse_resolves
from tests.prompts.test_registry import check_registry as check_learner_registry
from tests.pruning import plain
from tests.pruning.test_formulas import (
    check_budget_in_raster_order,
    check_kept_indices,
    formula_setup,
)
from tests.pruning.test_formulas import check_registry as check_pruner_registry
from tests.pruning.test_shared_probes import check_pruner_beside_probes, tiny_clip_4
from tests.registries import registered_in_files, text_learners, vision_pruners
from tests.test_configs import check_learner_composes
from tests.towers.test_text_trim import check_text_trim, small_hf, small_open_clip
from vlm import prompts, pruning

PRUNER = "tmp_value_norm"
LEARNER = "tmp_shallow_pair"
#: The module names the throwaway files are imported under (from a temporary folder on sys.path).
MODULES = {PRUNER: "vlm_tmp_value_norm", LEARNER: "vlm_tmp_shallow_pair"}

PRUNER_FILE = f'''
"""Value-norm pruning: S_j = (1/H) sum_h ||v_(h,j)||_2 over the values of block ``layer``; keep
CLS, every other non-patch token and the ``num_tokens`` best patches in raster order, cut after
``layer``."""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from vlm.context import BlockContext, resolve_layer
from vlm.kernels import AttnOutput, AttnSpec
from vlm.pruning.base import TokenPruner
from vlm.pruning.registry import register
from vlm.tokens import TokenState


@register("{PRUNER}")
class ValueNorm(TokenPruner):
    def __init__(self, num_tokens: int = 64, layer: int = -1) -> None:
        super().__init__(num_tokens)
        self.layer = layer

    @dataclass
    class PassState:
        kv_only: Optional[Tensor] = None  # the scored block's key/value-only tokens (dropped after it)

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return spec
        ctx.state(self).kv_only = state.kv_only
        return spec.replace(return_values=True)

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer != ctx.resolve_layer(self.layer):
            return state
        scores = attn.values.float().norm(dim=-1).mean(1)  # [B, keys]
        kv_only = ctx.state(self).kv_only
        if kv_only is not None:
            scores = scores[:, ~kv_only]
        state, _ = self.keep_top(state, scores, self.num_tokens)
        return state

    def cut_layers(self, num_blocks: int) -> tuple[list[int], bool]:
        return [resolve_layer(self.layer, num_blocks)], False
'''

LEARNER_FILE = f'''
"""A shallow pair: the class prompt ``[V]_1..[V]_M [CLASS] .`` with M learned context vectors,
and P learned vision prompts inserted after the CLS/register prefix at the tower's start."""

from typing import Any, Optional

import torch
from torch import nn

from vlm.context import Tower, TowerContext
from vlm.prompts.base import PromptLearner, TextInputs
from vlm.prompts.registry import register
from vlm.prompts.text_context import TextCodec, TextContext
from vlm.tokens import TokenState, TokenType, prefix_length


@register("{LEARNER}")
class ShallowPair(PromptLearner):
    learns_text = True
    towers = (Tower.VISION, Tower.TEXT)

    def __init__(self, n_ctx: int = 3, num_vision: int = 2, init_std: float = 0.02) -> None:
        super().__init__()
        self.n_ctx, self.num_vision, self.init_std = n_ctx, num_vision, init_std
        self.context = TextContext(type(self).__name__)
        self.codec: Optional[TextCodec] = None
        self.register_parameter("ctx", None)
        self.register_parameter("vision", None)

    def build(self, backbone: Any) -> None:
        self.codec = TextCodec.of(backbone, type(self).__name__)
        self.context.use_placeholders(self.n_ctx)
        ref = self.codec.embedding.weight
        self.ctx = nn.Parameter(torch.empty(self.n_ctx, self.codec.width, dtype=ref.dtype, device=ref.device).normal_(std=self.init_std))
        width = int(backbone.vision.width)
        self.vision = nn.Parameter(torch.empty(self.num_vision, width, dtype=ref.dtype, device=ref.device).normal_(std=self.init_std))

    def text_inputs(self, classnames: list[str], template: str = "{{}}") -> TextInputs:
        tokens, embeds = self.context.inputs(self.codec, classnames, self.ctx.device)
        return TextInputs(tokens=tokens, embeds=self.context.splice(embeds, self.ctx))

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        if ctx.tower is not Tower.VISION:
            return state
        index = prefix_length(state.batch_types, type(self).__name__)
        return state.insert(index, self.vision.unsqueeze(0), TokenType.PROMPT)
'''


@pytest.fixture
def one_file_methods(tmp_path: Path):
    """The throwaway modules written to ``tmp_path`` and imported; the registries and ``sys.modules``
    are restored (and checked) afterwards."""
    before = (prompts.available(), pruning.available())
    assert PRUNER not in before[1] and LEARNER not in before[0]
    assert not any(m in sys.modules for m in MODULES.values())
    (tmp_path / f"{MODULES[PRUNER]}.py").write_text(textwrap.dedent(PRUNER_FILE))
    (tmp_path / f"{MODULES[LEARNER]}.py").write_text(textwrap.dedent(LEARNER_FILE))
    with pytest.MonkeyPatch.context() as mp:
        # registrations made during the test go into copies of the registries' tables
        mp.setattr(prompts.PROMPTS, "_classes", dict(prompts.PROMPTS._classes))
        mp.setattr(pruning.PRUNERS, "_classes", dict(pruning.PRUNERS._classes))
        mp.syspath_prepend(str(tmp_path))  # jsonargparse imports a class_path by its module name
        try:
            yield {name: importlib.import_module(module) for name, module in MODULES.items()}
        finally:
            for module in MODULES.values():
                sys.modules.pop(module, None)
    assert (prompts.available(), pruning.available()) == before, "the throwaway methods are unregistered"


def value_norm_cut(layer_at: int, budget: int, sign: float = 1.0):
    """The rule on explicit values ``v [H, N, d]`` of one image: S_j = mean_h ||v[h, j]|| (``sign``
    -1: the opposite rule, keeping the smallest norms)."""

    def cut(layer, attn, v, ids):
        n = attn.shape[-1]
        if layer != layer_at:
            return list(range(n))
        scores = [sign * float(v[:, j].norm(dim=-1).mean()) for j in range(n)]
        return [0] + plain.top_sorted(scores, list(range(1, n)), budget)

    return cut


def test_each_method_registers_from_its_own_file(one_file_methods: dict[str, ModuleType], tmp_path: Path) -> None:
    for module in one_file_methods.values():
        assert Path(module.__file__).parent == tmp_path
    assert PRUNER in pruning.available() and LEARNER in prompts.available()
    assert PRUNER not in registered_in_files(pruning) and LEARNER not in registered_in_files(prompts)
    # the generic suites' lists, read from the registries, now hold them
    assert PRUNER in vision_pruners() and LEARNER in text_learners()
    check_pruner_registry(PRUNER)
    check_learner_registry(LEARNER)
    check_jsonargparse_resolves(LEARNER)


def test_the_pruner_runs_through_the_generic_suites(one_file_methods: dict[str, ModuleType], tmp_path: Path) -> None:
    # its formula on a tiny LLaVA (7 blocks up to the feature layer, 36 patches): a cut in the
    # middle of the pass (the kept tokens run 4 more blocks) and one at its end
    runner, pixels = formula_setup()
    assert runner.vision.blocks_for(runner.feature_layer) == 7
    check_kept_indices(runner, pixels, PRUNER, dict(num_tokens=9, layer=2), lambda n: value_norm_cut(2, 9))
    check_kept_indices(runner, pixels, PRUNER, dict(num_tokens=5), lambda n: value_norm_cut(n - 1, 5))
    with pytest.raises(AssertionError):  # the check tells rules apart: the smallest norms are not kept
        check_kept_indices(runner, pixels, PRUNER, dict(num_tokens=9, layer=2), lambda n: value_norm_cut(2, 9, sign=-1.0))
    check_budget_in_raster_order(runner, pixels, PRUNER, dict(num_tokens=10))
    check_pruner_beside_probes(tiny_clip_4(), PRUNER, dict(num_tokens=5, layer=1))
    check_pruner_composes(PRUNER, tmp_path)


def test_the_learner_runs_through_the_generic_suites(one_file_methods: dict[str, ModuleType], tmp_path: Path) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for backbone in (small_open_clip(), small_hf()):  # both text towers
        learner = check_text_trim(backbone, LEARNER)
        with torch.no_grad():  # and its vision prompts act on the image features
            assert not torch.allclose(backbone.encode_image(images, [learner]), backbone.encode_image(images))
    check_learner_composes(LEARNER, tmp_path)
