"""What a module may ask of its datamodule, as typed protocols instead of attribute probes.

A classifier reads its classes, test subsets, template and image size from the datamodule it runs
with (``CLIPClassifier``, ``ViTClassifier``); an episodic classifier its class names and template.
A datamodule satisfies a protocol by having the attributes (structural typing); modules test it
once with :func:`data_of` and then read plain attributes.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, TypeVar, runtime_checkable

from vlm.datamodules.settings import ImageTransforms, Loaders


@runtime_checkable
class SizedImages(Protocol):
    """Data that turns every image into a square tensor of ``transforms.image_size`` pixels
    (checked against the backbone's input size): an :class:`~vlm.datamodules.settings.ImageTransforms`."""

    transforms: ImageTransforms


@runtime_checkable
class ClassificationData(Protocol):
    """Few-shot / base-to-new classification data (``FewShotDataModule`` and its subclasses).

    ``classnames``: the training classes in label order; ``test_classnames``: ``{subset: classes}``
    per test loader, in ``test_subsets`` order; ``template``: the hand-written prompt;
    ``num_classes``: ``len(classnames)``; ``transforms``: the image settings (size, normalisation)."""

    classnames: list[str]
    test_classnames: dict[str, list[str]]
    test_subsets: list[str]
    template: str
    num_classes: int
    transforms: ImageTransforms


@runtime_checkable
class CaptionData(Protocol):
    """Image-caption pairs built from class names: ``classnames`` (label order) and the caption
    ``templates`` (``"{}"`` slots for the class name), for contrastive fine-tuning."""

    classnames: list[str]
    templates: list[str]


@runtime_checkable
class QuestionData(Protocol):
    """Visual questions with reference answers and the ``metric`` that scores them
    (a ``vlm.metrics_vqa.SCORERS`` name)."""

    metric: str


@runtime_checkable
class ShotData(Protocol):
    """Few-shot training shots a learner may ask to see as frozen features before fitting:
    ``train_set.items`` (the (path, label) items), the image and loader settings; ``setup`` and
    ``train_dataloader`` as a LightningDataModule has them."""

    train_set: Any
    transforms: ImageTransforms
    loader: Loaders

    def setup(self, stage: str) -> None: ...

    def train_dataloader(self) -> Any: ...


@runtime_checkable
class LabelledData(Protocol):
    """Data with named classes: ``classnames`` in label order (predictions are written with names)."""

    classnames: list[str]


@runtime_checkable
class NamedData(Protocol):
    """Data that names its dataset (``results.json``'s ``dataset``)."""

    dataset: Optional[str]


@runtime_checkable
class ReportedData(Protocol):
    """Data that adds to ``results.json``: ``result_extras()`` is what else a run's results record
    about the data (its split, shot counts, ...)."""

    def result_extras(self) -> dict[str, Any]: ...


@runtime_checkable
class EpisodicData(LabelledData, Protocol):
    """N-way K-shot episodes over a labelled pool: its ``classnames`` (label order) and ``template``."""

    template: str


P = TypeVar("P")


def data_of(trainer: Any, protocol: type[P]) -> Optional[P]:
    """The trainer's datamodule when it satisfies ``protocol``, else None (no trainer, no
    datamodule, or another kind of data)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return dm if isinstance(dm, protocol) else None
