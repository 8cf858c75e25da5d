"""Checks that find bad runs early and name the problem and the fix.

* :func:`check_token_budget` runs when any model with a pruner is built (through
  ``Backbone.check_budget``: the CLIP/ViT classifiers, ``LlavaEval``): a pruner's token budget must
  fit the tokens the backbone gives it, so a budget that would keep everything is refused instead of
  labelling an unpruned run with the pruner's name.
* :func:`check_hooks` runs when a classifier is built: the budget above, and the prompt learner and
  pruner must be able to work together.
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

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from vlm.protocols import ImageBackbone


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


# --- token budgets ------------------------------------------------------------------------------
def _init_params(obj: Any) -> set[str]:
    """Names of the arguments ``type(obj).__init__`` declares (to name the one a fix should set)."""
    try:
        return set(inspect.signature(type(obj).__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def check_token_budget(
    pruner: Any, patches: Optional[int], *, unit: str = "image", views: int = 1, backbone: str = "the backbone"
) -> None:
    """Raise :class:`TokenBudgetError` if ``pruner`` asks for more tokens than the backbone gives it.

    The one budget check of every backbone: ``Backbone.check_budget`` calls it with the backbone's
    own counts when a model is built (never per batch), so a new backbone only declares them.

    Args:
        pruner: a pruner, or None (nothing to check). Only its declared attributes are read:
            ``towers``, ``name``, ``num_tokens``, and for an LLM-stage pruner ``vision_stage`` and ``layer``.
        patches: patch tokens a vision pruner sees per ``unit`` (the vision tower's patches at the
            feature layer), or None when unknown (no check).
        unit: what one vision-tower row is: ``"image"`` (CLIP, ViT, LLaVA-1.5), ``"crop"`` (LLaVA-NeXT
            anyres: the base view and each sub-crop are pruned separately, each to ``num_tokens``).
        views: the most units one image becomes (1; LLaVA-NeXT: the base view plus the largest crop
            grid). With one image per sample it bounds the visual tokens that reach an LLM-stage cut.
        backbone: how the backbone is named in the message.

    Rules (a budget equal to what is available is allowed: it keeps every token, as on CLIP):

    * a vision pruner: ``num_tokens <= patches``;
    * an LLM-stage pruner (``"llm"`` in ``towers``): its ``vision_stage`` by the rule above, and its
      own ``num_tokens`` at most ``views x`` the patches per unit that reach the LLM (the vision
      stage's budget, or every patch without one); a larger budget never cuts anything.
    """
    if pruner is None or patches is None:
        return
    where = f"the backbone produces only {patches} per {unit} ({backbone})"
    if "llm" not in tuple(getattr(pruner, "towers", ("vision",))):
        if pruner.num_tokens > patches:
            raise TokenBudgetError(
                f"Pruner {pruner.name!r} keeps num_tokens={pruner.num_tokens} patch tokens, but {where}. "
                f"Set pruner num_tokens <= {patches}, or drop the pruner to keep every token."
            )
        return
    params = _init_params(pruner)
    stage = getattr(pruner, "vision_stage", None)
    per_unit = patches
    if stage is not None:
        if stage.num_tokens > patches:
            setting = "crop_tokens" if "crop_tokens" in params else "its vision_stage's num_tokens"
            alone = ""
            if "two_stage" in params and pruner.num_tokens <= views * patches:
                alone = ", or run the LLM stage alone (two_stage=False)"
            raise TokenBudgetError(
                f"Pruner {pruner.name!r} runs a vision stage ({stage.name!r}) that keeps num_tokens={stage.num_tokens} "
                f"patch tokens per {unit}, but {where}. Set {setting} <= {patches}{alone}."
            )
        per_unit = stage.num_tokens
    reach = views * per_unit
    if pruner.num_tokens <= reach:
        return
    source = f"kept by its vision stage {stage.name!r}" if stage is not None else "every patch"
    count = f"{per_unit} patch tokens per image" if views == 1 else f"{views} {unit}s per image x {per_unit} patch tokens"
    fixes = [f"Set pruner num_tokens <= {reach}"]
    needed = -(-pruner.num_tokens // views)  # the per-unit vision budget that would let the cut act
    if stage is not None and needed <= patches:
        setting = "crop_tokens" if "crop_tokens" in params else "its vision_stage's num_tokens"
        fixes.append(f"raise {setting} to >= {needed}")
    if stage is not None and "two_stage" in params and pruner.num_tokens <= views * patches:
        fixes.append("run the LLM stage alone (two_stage=False)")
    fix = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1]
    raise TokenBudgetError(
        f"Pruner {pruner.name!r} keeps num_tokens={pruner.num_tokens} visual tokens per sample after LLM layer "
        f"{getattr(pruner, 'layer', '?')}, but at most {reach} reach it ({count}, {source}; {backbone}), "
        f"so its cut would keep every token. {fix}."
    )


# --- hook compatibility ------------------------------------------------------------------------
def num_vision_blocks(backbone: Any) -> Optional[int]:
    """Blocks of an :class:`~vlm.protocols.ImageBackbone`'s vision tower, or None for another kind."""
    return int(backbone.vision.num_layers) if isinstance(backbone, ImageBackbone) else None


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
    if isinstance(backbone, ImageBackbone):
        backbone.check_budget(pruner)
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
