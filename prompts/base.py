"""The prompt-learner interface: a :class:`~vlm.hooks.TowerHook` with learnable prompts.

Life cycle (driven by the LightningModule):
  1. ``__init__(**hyper_parameters)``: only configuration, no backbone yet (LightningCLI builds it).
  2. ``build(backbone)``: create parameters sized to the backbone (widths, depth, tokenizer).
  3. per step: hooks run inside the towers; ``text_inputs(classnames)`` gives the text tower its
     (learned) inputs; ``losses(outputs, batch)`` adds method-specific terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from vlm.hooks import TowerHook


@dataclass
class TextInputs:
    """What the text tower should encode: token ids (for types and pooling) and, optionally, the
    token embeddings that replace ``token_embedding(tokens)`` (e.g. with learned context)."""

    tokens: Tensor
    embeds: Optional[Tensor] = None


class PromptLearner(TowerHook):
    """Base class of all prompt learners. Subclasses register a short name in ``vlm.prompts``."""

    #: Short registry name, set by ``@register``.
    name: str = ""
    #: True if the method needs a frozen, prompt-free pass of the same backbone (e.g. for a
    #: consistency loss against the zero-shot model).
    needs_frozen_pass: bool = False
    #: True if the text features depend on learned parameters (no caching of class features).
    learns_text: bool = False

    #: True if the learner reads the text embeddings of the classes at hand (e.g. prompts built
    #: from them); the module then calls :meth:`set_class_text` before every pass.
    needs_class_text: bool = False
    #: Width of those class text embeddings; ``None`` until known (the module sets it before
    #: :meth:`build` when it encodes class text with another model than the backbone).
    class_text_width: Optional[int] = None

    def build(self, backbone: Any) -> None:
        """Create parameters for ``backbone``. The backbone is kept as a plain reference (it is
        owned by the LightningModule and must not appear in this learner's state dict)."""
        self.__dict__["backbone"] = backbone

    def text_inputs(self, classnames: list[str], template: str = "{}") -> Optional[TextInputs]:
        """Text-tower inputs for ``classnames``; ``None`` means "use the frozen template prompts"."""
        return None

    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra loss terms, each logged under its own name (already weighted)."""
        return {}

    def on_train_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent schedules (warm-ups, loss switches)."""

    def on_fit_start(self, module: Any) -> None:
        """Called once before training with the LightningModule (its trainer and datamodule are
        reachable), e.g. to compute class prototypes from the training shots."""

    def set_class_text(self, embeddings: Optional[Tensor]) -> None:
        """The class text embeddings ``[C, E]`` the next passes use (learners with ``needs_class_text``)."""
        raise TypeError(f"{type(self).__name__} does not read class text (needs_class_text is False).")

    def positional_tail(self) -> Optional[tuple[int, int]]:
        """``(n, last)`` if the learner finds vision prompt slots *by position*, as the last ``n``
        tokens, before blocks ``1..last``; None otherwise. A pruner whose per-sample counts differ
        before ``last`` would move those slots (vlm.runtime.reliability.check_hooks)."""
        return None

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
