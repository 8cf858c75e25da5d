"""Checks that find bad runs early and name the problem and the fix.

* :func:`check_hooks` runs when a classifier is built: a pruner's token budget must fit the
  backbone's patch tokens, and the prompt learner and pruner must be able to work together.
* :func:`check_finite_losses` runs on every loss: a NaN or inf term stops the run with an error
  naming the step and the term, instead of silently training on garbage for hours.

Which prompt/pruner combinations are invalid, and why. Every pruner keeps every non-patch token
(CLS, registers, prompts) and keeps the kept tokens in their order (``TokenPruner.keep_top``), so
prompts are never dropped. What can break is a learner that finds its prompt slots *by position*.
Both sides declare what the check needs, so it names no method:

* ``PromptLearner.positional_tail()``: ``(n, last)`` when the learner replaces the last ``n``
  tokens before blocks ``1..last`` (the deep vision-language learners, which append their vision
  prompts after the patches), else None (prompts inserted after the never-pruned prefix, key/value-only
  prompts, text-only learners).
* ``TokenPruner.cut_layers(num_blocks)``: the blocks after which it may cut and whether its counts
  may differ per sample. A cut that keeps the same number of patches in every sample leaves the
  tail last; one that keeps a different number (entropy-adaptive counts) makes the sequence ragged,
  and padding then sits at the end of the shorter samples, where the replacement would overwrite
  it. That combination is invalid when such a cut happens before ``last``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


class IncompatibleHooksError(ValueError):
    """A prompt learner and a pruner that cannot work together."""


class TokenBudgetError(ValueError):
    """A pruner asked to keep more patch tokens than the backbone produces."""


# --- numerical guard ---------------------------------------------------------------------------
def check_finite_losses(terms: Mapping[str, Tensor], step: int, stage: str = "train", epoch: Optional[int] = None) -> None:
    """Raise :class:`NonFiniteLossError` if any term of ``terms`` is NaN or inf.

    One device sync for all terms (a stacked ``isfinite``); the offending terms are then named with
    their values, the global step and the stage, with the usual fixes.
    """
    if not terms:
        return
    values = torch.stack([t.detach().float().sum() for t in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = {name: float(v) for name, v in zip(terms, values.tolist()) if not torch.isfinite(torch.tensor(v))}
    where = f"global step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
    raise NonFiniteLossError(
        f"Non-finite {stage} loss at {where}: "
        + ", ".join(f"term {name!r} = {value}" for name, value in bad.items())
        + f" (all terms: {sorted(terms)}). The run was stopped so it does not train on NaNs. "
        "Lower the learning rate, use 32-true or bf16-mixed instead of 16-mixed, check the data for "
        "broken images or labels, or set the weight of that term to 0; resume from the last checkpoint."
    )


# --- hook compatibility ------------------------------------------------------------------------
def num_patch_tokens(backbone: Any) -> Optional[int]:
    """Patch tokens per image of a CLIP (open_clip) or timm ViT backbone, or None if unknown."""
    model = getattr(backbone, "model", None)
    visual = getattr(model, "visual", None)
    grid = getattr(visual, "grid_size", None)
    if grid is not None:
        return int(grid[0]) * int(grid[1])
    patch_embed = getattr(model, "patch_embed", None)
    count = getattr(patch_embed, "num_patches", None)
    return int(count) if count is not None else None


def num_vision_blocks(backbone: Any) -> Optional[int]:
    """Blocks of the backbone's vision tower runner, or None if unknown."""
    vision = getattr(backbone, "vision", None)
    count = getattr(vision, "num_layers", None)
    return int(count) if count is not None else None


def check_hooks(backbone: Any, prompt_learner: Any = None, pruner: Any = None) -> None:
    """Raise a clear error if ``pruner`` cannot run on ``backbone`` beside ``prompt_learner``."""
    if pruner is None:
        return
    if "vision" not in getattr(pruner, "towers", ("vision",)):
        from vlm.pruning.registry import PRUNERS

        vision = [n for n in PRUNERS.available() if "vision" in PRUNERS.get(n).towers]
        raise IncompatibleHooksError(
            f"Pruner {pruner.name!r} cuts tokens inside a language model (towers={tuple(pruner.towers)}); "
            f"a {type(backbone).__name__} classifier has none. Use it with LlavaEval on a LLaVA backbone, "
            f"or pick a vision-tower pruner ({', '.join(vision)})."
        )
    available = num_patch_tokens(backbone)
    if available is not None and pruner.num_tokens > available:
        raise TokenBudgetError(
            f"Pruner {pruner.name!r} keeps num_tokens={pruner.num_tokens} patch tokens, but the backbone "
            f"produces only {available} per image. Set pruner num_tokens <= {available}, or drop the "
            "pruner to keep every token."
        )
    blocks = num_vision_blocks(backbone)
    tail = prompt_learner.positional_tail() if prompt_learner is not None else None
    if tail is None or blocks is None:
        return
    n_slots, last_replaced = tail
    cuts, ragged = pruner.cut_layers(blocks)
    early = [c for c in cuts if c < last_replaced]
    if ragged and early:
        raise IncompatibleHooksError(
            f"Prompt learner {prompt_learner.name!r} replaces its vision prompts by position (the last "
            f"{n_slots} tokens) before blocks 1..{last_replaced}, but pruner {pruner.name!r} keeps a different "
            f"number of tokens per image after block(s) {early}, which moves those slots. Use a pruner with a "
            f"fixed count (its cut_layers say so), cut at or after block {last_replaced}, or prompt fewer "
            f"layers (up to block {min(early) + 1})."
        )
