"""The prompt-learner interface: a :class:`~vlm.hooks.TowerHook` with learnable prompts.

Life cycle (driven by the LightningModule):
  1. ``__init__(**hyper_parameters)``: only configuration, no backbone yet (LightningCLI builds it).
  2. ``build(backbone)``: create parameters sized to the backbone (widths, depth, tokenizer). A
     learner keeps the typed values it needs (e.g. a :class:`~vlm.prompts.text_context.TextCodec`),
     never the backbone itself.
  3. before fit: the module serves what the learner declared in :meth:`PromptLearner.fit_requests`
     (e.g. frozen features of the training shots) through :meth:`PromptLearner.receive`.
  4. per step: hooks run inside the towers; ``text_inputs(classnames)`` gives the text tower its
     (learned) inputs; ``losses(outputs, batch, encoder)`` adds method-specific terms, with the
     module's backbone handed in as ``encoder`` for methods that encode extra views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Protocol

from torch import Tensor

from vlm.hooks import TowerHook


@dataclass
class TextInputs:
    """What the text tower should encode: token ids (for types and pooling) and, optionally, the
    token embeddings that replace ``token_embedding(tokens)`` (e.g. with learned context)."""

    tokens: Tensor
    embeds: Optional[Tensor] = None


class Encoder(Protocol):
    """What a learner's losses may ask of the module's backbone: the towers' encoders (with hooks
    of the learner's choosing), the tokenizer and the logit scale."""

    def encode_image(self, images: Tensor, hooks: Optional[Iterable[TowerHook]] = None, normalize: bool = False) -> Tensor: ...

    def encode_text(
        self, tokens: Tensor, hooks: Optional[Iterable[TowerHook]] = None, embeds: Optional[Tensor] = None, normalize: bool = False
    ) -> Tensor: ...

    def tokenize(self, texts: list[str]) -> Tensor: ...

    @property
    def logit_scale(self) -> Tensor: ...


@dataclass(frozen=True)
class TrainShotFeatures:
    """A request served before fit: the frozen backbone's L2-normalised image features (no hooks)
    of every training shot. ``transform``: ``"test"`` (un-augmented, the test transform) or
    ``"train"`` (the training loader as it is)."""

    transform: str = "test"

    def __post_init__(self) -> None:
        if self.transform not in ("test", "train"):
            raise ValueError(f"TrainShotFeatures.transform must be 'test' or 'train', got {self.transform!r}.")


@dataclass(frozen=True)
class ShotFeatures:
    """The answer to :class:`TrainShotFeatures`: ``features [N, E]``, ``labels [N]`` and the
    training ``classnames`` (label ``i`` is ``classnames[i]``)."""

    features: Tensor
    labels: Tensor
    classnames: list[str]


class PromptLearner(TowerHook):
    """Base class of all prompt learners. Subclasses register a short name in ``vlm.prompts``."""

    #: Short registry name, set by ``@register``.
    name: str = ""
    #: How the official code's released checkpoints name this learner's tensors
    #: (:class:`vlm.prompts.released.DasslLayout`), or None; read for the class that sets it only.
    released_layout: Optional[Any] = None
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

    def bind_classes(self, classnames: list[str]) -> None:
        """The training classes in label order, given by the module before :meth:`build` when it
        knows them (e.g. for per-class parameters)."""

    def check_classes(self, classnames: list[str]) -> None:
        """Raise if the learner cannot score ``classnames`` (the module checks every test subset
        before testing)."""

    def build(self, backbone: Any) -> None:
        """Create parameters sized to ``backbone``; keep only typed values taken from it."""

    def text_inputs(self, classnames: list[str], template: str = "{}") -> Optional[TextInputs]:
        """Text-tower inputs for ``classnames``; ``None`` means "use the frozen template prompts"."""
        return None

    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], encoder: Encoder) -> dict[str, Tensor]:
        """Extra loss terms, each logged under its own name (already weighted). ``encoder`` is the
        module's backbone, for methods that encode extra views of the batch."""
        return {}

    def on_train_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent schedules (warm-ups, loss switches)."""

    def fit_requests(self) -> tuple[TrainShotFeatures, ...]:
        """What the learner needs from the data before fit; the module serves each through
        :meth:`receive` (no learner reads a datamodule itself)."""
        return ()

    def receive(self, request: TrainShotFeatures, answer: ShotFeatures) -> None:
        """The module's answer to one of :meth:`fit_requests`."""
        raise TypeError(f"{type(self).__name__} requested {request} but does not implement receive().")

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
