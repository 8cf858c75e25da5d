"""What a module may ask of its datamodule, as typed protocols instead of attribute probes.

A classifier reads its classes, test subsets, template and image size from the datamodule it runs
with (``CLIPClassifier``, ``ViTClassifier``); an episodic classifier its class names and template.
A datamodule satisfies a protocol by having the attributes (structural typing); modules test it
once with :func:`data_of` and then read plain attributes.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, TypeVar, runtime_checkable


@runtime_checkable
class ClassificationData(Protocol):
    """Few-shot / base-to-new classification data (``FewShotDataModule`` and its subclasses).

    ``classnames``: the training classes in label order; ``test_classnames``: ``{subset: classes}``
    per test loader, in ``test_subsets`` order; ``template``: the hand-written prompt;
    ``num_classes``: ``len(classnames)``; ``image_size``: the square input size."""

    classnames: list[str]
    test_classnames: dict[str, list[str]]
    test_subsets: list[str]
    template: str
    num_classes: int
    image_size: int


@runtime_checkable
class EpisodicData(Protocol):
    """N-way K-shot episodes over a labelled pool: its ``classnames`` (label order) and ``template``."""

    classnames: list[str]
    template: str


P = TypeVar("P")


def data_of(trainer: Any, protocol: type[P]) -> Optional[P]:
    """The trainer's datamodule when it satisfies ``protocol``, else None (no trainer, no
    datamodule, or another kind of data)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return dm if isinstance(dm, protocol) else None
