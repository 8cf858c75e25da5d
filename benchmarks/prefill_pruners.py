"""The pruners of the prefill benchmark (``prefill.py``): each at a budget on the benchmark's model,
with the released schedules of the multi-cut LLM pruners scaled to its depth, and each scoring
every token while keeping all (the overhead column)."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch

from vlm import pruning
from vlm.pruning.registry import PRUNERS


def is_llm_stage(name: str) -> bool:
    """Whether the registered pruner ``name`` cuts inside the LLM (an :class:`LlmTokenPruner`)."""
    from vlm.pruning.llm import LlmTokenPruner

    return issubclass(PRUNERS.get(name), LlmTokenPruner)


def scaled_layers(released: Sequence[int], num_layers: int, of: int = 32) -> tuple[int, ...]:
    """A released layer schedule for ``of`` (LLaVA-1.5's 32) decoder layers, moved proportionally to
    a ``num_layers`` model (strictly increasing, each at least the previous + 1)."""
    out: list[int] = []
    for layer in released:
        out.append(max(round(layer * num_layers / of), out[-1] + 1 if out else 0))
    return tuple(out)


def pyramiddrop_args(budget: int, n_patch: int, num_layers: int) -> dict[str, Any]:
    """PyramidDrop at a layer-average ``budget``: the released stage split (8/16/24 of 32) scaled to
    the model, ratios solved for the budget; a ValueError (the row is skipped) when the first stage
    alone averages more than the budget."""
    return dict(num_tokens=budget, layers=scaled_layers((8, 16, 24), num_layers),
                num_layers=num_layers, reference_tokens=n_patch)


def sparsevlm_args(budget: int, n_patch: int, num_layers: int) -> dict[str, Any]:
    """SparseVLM at ``budget``: the released per-layer keep counts of the 576-token budget
    ``budget * 576 / n_patch``, scaled to ``n_patch``, at the released layers (2/6/15 of 32) scaled
    to the model."""
    from vlm.pruning.sparsevlm import RELEASED_COUNTS, RELEASED_LAYERS

    counts = RELEASED_COUNTS[round(budget * 576 / n_patch)]
    return dict(num_tokens=budget, layers=scaled_layers(RELEASED_LAYERS, num_layers),
                counts=tuple(max(1, round(c * n_patch / 576)) for c in counts))


#: pruners whose constructor needs more than ``num_tokens`` on the benchmark model:
#: ``name -> (budget, patches, decoder layers) -> kwargs``
BENCH_ARGS: dict[str, Callable[[int, int, int], dict[str, Any]]] = {
    "flowcut_llm": lambda budget, n, layers: dict(num_tokens=budget, two_stage=False),
    "pyramiddrop": pyramiddrop_args,
    "sparsevlm": sparsevlm_args,
}

#: keep-all-but-one settings of the multi-cut pruners (every cut scores; the first drops one token)
KEEP_ALL_ARGS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "pyramiddrop": lambda n, layers: dict(layers=scaled_layers((8, 16, 24), layers),
                                          ratios=((n - 0.5) / n,) * 3),
    "sparsevlm": lambda n, layers: dict(num_tokens=n - 1, counts=(n - 1,) * 3,
                                        layers=scaled_layers((2, 6, 15), layers)),
}


def make_pruner(name: str, num_tokens: int, n_patch: int = 576, num_layers: int = 32):
    """``name`` at ``num_tokens`` on a model of ``n_patch`` patches and ``num_layers`` decoder layers
    (:data:`BENCH_ARGS`): ``flowcut_llm`` without its vision stage (on LLaVA-1.5's single view the
    vision stage would keep T/2 patches and leave the LLM cut nothing to do); PyramidDrop and
    SparseVLM with their released schedules scaled to the model."""
    args = BENCH_ARGS.get(name, lambda budget, n, layers: dict(num_tokens=budget))(num_tokens, n_patch, num_layers)
    return pruning.create(name, **args)


def keep_all_pruner(name: str, n_patch: int, num_layers: int):
    """``name`` scoring every visual token but keeping all (LLM stage: all but one at its first cut,
    since DART returns early when it keeps all), for the overhead column."""
    if not is_llm_stage(name):
        return make_pruner(name, n_patch, n_patch, num_layers)
    if name in KEEP_ALL_ARGS:
        return pruning.create(name, **KEEP_ALL_ARGS[name](n_patch, num_layers))
    return make_pruner(name, n_patch - 1, n_patch, num_layers)


def qwen_skip_reason(name: str) -> Optional[str]:
    """Why ``name`` is not in the Qwen table (None: it is)."""
    if is_llm_stage(name):
        return "an LLM-stage pruner; the Qwen table times vision pruners (the Qwen LLM cut: tests/pruning/test_fastv_dart.py)"
    if not getattr(PRUNERS.get(name), "runs_on_merge_units", True):
        return "declares runs_on_merge_units = False (needs a CLS row or the patch grid, which Qwen's towers lack)"
    return None


class ScoringClock:
    """The time an LLM-stage cut spends scoring, measured inside the cut run: the decoder's probe
    (query re-projection, gathers, the log-sum-exps and the other groups the pruner declares) and key
    re-projection (``score_next``), and the pruner's ``keep_stage`` / ``merge_stage``. It wraps those
    methods of one decoder and one pruner instance; :attr:`seconds` accumulates until reset. A direct
    measure, unlike the difference of two whole prefills, so its noise is that of the scoring alone."""

    def __init__(self, decoder: Any, pruner: Any, device: str) -> None:
        self.seconds = 0.0
        self.device = device
        for owner, name in ((decoder, "probe"), (decoder, "project_kv"), (pruner, "keep_stage"),
                            (pruner, "merge_stage")):
            setattr(owner, name, self.timed(getattr(owner, name)))

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            return out

        return run
