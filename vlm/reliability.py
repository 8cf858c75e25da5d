"""Checks that find bad runs early and name the problem and the fix.

* :func:`check_hooks` runs when a classifier is built: a pruner's token budget must fit the
  backbone's patch tokens, and the prompt learner and pruner must be able to work together.
* :func:`check_finite_losses` runs on every loss: a NaN or inf term stops the run with an error
  naming the step and the term, instead of silently training on garbage for hours.

Which prompt/pruner combinations are invalid, and why. Every pruner keeps every non-patch token
(CLS, registers, prompts) and keeps the kept tokens in their order (``TokenPruner.keep_top``), so
prompts are never dropped. What can break is a learner that finds its prompt slots *by position*:

* VPT / VPT-deep / VFPT insert prompts right after the CLS/register prefix and replace them at that
  index: the prefix is never pruned, so the index holds under any pruner. Compatible.
* TCPA and KTPP insert key/value-only prompts inside one block and drop them after it. Compatible.
* Text-only learners (CoOp) never touch the vision tower. Compatible.
* The deep vision-language learners (IVLP, MaPLe, DPL, DAPT, DiSa: ``DeepVLPrompts``) append the
  vision prompts after the patches and, before each block ``1..depth_vision-1``, replace *the last
  n_ctx_vision tokens*. A cut that keeps the same number of patches in every sample leaves them
  last. A cut that keeps a different number per sample (FlowCut's entropy-adaptive counts) makes
  the sequence ragged: padding then sits at the end of the shorter samples, and the replacement
  would overwrite it. That combination is invalid when such a cut happens before the last layer
  whose prompts are replaced; a pruner that only cuts at or after that layer is fine.
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


def pruner_cuts(pruner: Any, num_blocks: int) -> tuple[list[int], bool]:
    """(the blocks after which ``pruner`` may cut, whether its counts may differ per sample).

    Read from the pruners' own settings; a pruner this function does not know is assumed to cut
    anywhere with per-sample counts (the safe assumption for the check below).
    """
    from vlm.pruning.baselines import CLSAttention, RandomPruner
    from vlm.pruning.flowcut import FlowCut
    from vlm.pruning.vtc_cls import VTCCLS

    def resolve(layer: int) -> int:
        return layer if layer >= 0 else num_blocks + layer

    if isinstance(pruner, (CLSAttention, RandomPruner)):
        return [resolve(pruner.layer)], False
    if isinstance(pruner, VTCCLS):
        return [resolve(pruner.prune_layer)], False
    if isinstance(pruner, FlowCut):  # cuts where (num_blocks - 2 - layer) is even and >= 0
        return [layer for layer in range(num_blocks - 1) if (num_blocks - 2 - layer) % 2 == 0], True
    return list(range(num_blocks)), True


def check_hooks(backbone: Any, prompt_learner: Any = None, pruner: Any = None) -> None:
    """Raise a clear error if ``pruner`` cannot run on ``backbone`` beside ``prompt_learner``."""
    if pruner is None:
        return
    if "vision" not in getattr(pruner, "towers", ("vision",)):
        raise IncompatibleHooksError(
            f"Pruner {pruner.name!r} cuts tokens inside a language model (towers={tuple(pruner.towers)}); "
            f"a {type(backbone).__name__} classifier has none. Use it with LlavaEval on a LLaVA backbone, "
            "or pick a vision-tower pruner (vtc_cls, flowcut, cls_attention, random)."
        )
    available = num_patch_tokens(backbone)
    if available is not None and pruner.num_tokens > available:
        raise TokenBudgetError(
            f"Pruner {pruner.name!r} keeps num_tokens={pruner.num_tokens} patch tokens, but the backbone "
            f"produces only {available} per image. Set pruner num_tokens <= {available}, or drop the "
            "pruner to keep every token."
        )
    from vlm.prompts._deep import DeepVLPrompts

    blocks = num_vision_blocks(backbone)
    if not isinstance(prompt_learner, DeepVLPrompts) or prompt_learner.depth_vision < 2 or blocks is None:
        return
    cuts, ragged = pruner_cuts(pruner, blocks)
    last_replaced = prompt_learner.depth_vision - 1  # prompts are replaced before blocks 1..depth_vision-1
    early = [c for c in cuts if c < last_replaced]
    if ragged and early:
        raise IncompatibleHooksError(
            f"Prompt learner {prompt_learner.name!r} replaces its vision prompts by position (the last "
            f"{prompt_learner.n_ctx_vision} tokens) before blocks 1..{last_replaced}, but pruner "
            f"{pruner.name!r} keeps a different number of tokens per image after block(s) {early}, which "
            "moves those slots. Use a pruner with a fixed count (cls_attention, vtc_cls, random), cut at "
            f"or after block {last_replaced}, or lower depth_vision to {min(early) + 1}."
        )
