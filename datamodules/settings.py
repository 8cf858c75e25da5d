"""The image and loader settings every image datamodule shares, declared once.

``ImageTransforms`` says how an image becomes a tensor (crop size, normalisation, the training
augmentations by Dassl name); ``Loaders`` how the DataLoaders are built. A datamodule takes them as
two arguments (``transforms``, ``loader``), so a config writes::

    data:
      class_path: vlm.datamodules.DatasetDataModule
      init_args:
        root: data/caltech101
        dataset: caltech101
        transforms: {image_size: 224}
        loader: {batch_size: 32, num_workers: 8}

and a key left out keeps the datamodule's own default (MNIST's 28 px, say): jsonargparse fills a
dataclass argument field by field from the default instance. On the command line:
``--data.init_args.loader.batch_size 8``. The flat keys of earlier versions
(``data.init_args.batch_size``) are refused with the new key named (:data:`MOVED_KEYS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from vlm.datamodules.transforms import (
    AVAILABLE_TRAIN_TRANSFORMS,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_TRAIN_TRANSFORMS,
    build_test_transform,
    build_train_transform,
)


@dataclass(frozen=True)
class ImageTransforms:
    """How training and evaluation images are turned into tensors.

    Args:
        image_size: crop size of train and test images (must equal the backbone's input size).
        mean: normalisation mean (CLIP's by default).
        std: normalisation std (CLIP's by default).
        train: training transforms by Dassl name (``random_resized_crop``, ``random_crop``,
            ``random_flip``, ``normalize``), applied in Dassl's order; evaluation images are resized,
            centre-cropped and normalised iff ``normalize`` is listed.
        crop_scale: ``RandomResizedCrop``'s scale range (Dassl's ``INPUT.RRCROP_SCALE``).
    """

    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    train: tuple[str, ...] = DEFAULT_TRAIN_TRANSFORMS
    crop_scale: tuple[float, float] = (0.08, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "crop_scale", tuple(float(c) for c in self.crop_scale))
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"transforms.image_size must be a positive whole number of pixels, got {self.image_size!r}.")
        if len(self.mean) != len(self.std):
            raise ValueError(f"transforms.mean and transforms.std need one value per channel; got {self.mean} and {self.std}.")
        unknown = [n for n in self.train if n not in AVAILABLE_TRAIN_TRANSFORMS]
        if unknown:
            raise ValueError(f"Unknown training transform(s) {unknown} in transforms.train. Available: {', '.join(AVAILABLE_TRAIN_TRANSFORMS)}.")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"transforms.crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}.")

    @property
    def normalize(self) -> bool:
        """Whether images are normalised (train and evaluation alike)."""
        return "normalize" in self.train


@dataclass(frozen=True)
class Loaders:
    """How the DataLoaders are built.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (per process).
        num_workers: DataLoader worker processes.
        pin_memory: DataLoader ``pin_memory``.
    """

    batch_size: int = 32
    eval_batch_size: int = 100
    num_workers: int = 0
    pin_memory: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"loader.{name} must be a whole number >= 1, got {value!r}.")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"loader.num_workers must be a whole number >= 0, got {self.num_workers!r}.")


#: flat ``data.init_args`` keys of earlier versions -> where they live now.
MOVED_KEYS: dict[str, str] = {
    "image_size": "transforms.image_size",
    "mean": "transforms.mean",
    "std": "transforms.std",
    "train_transforms": "transforms.train",
    "crop_scale": "transforms.crop_scale",
    "batch_size": "loader.batch_size",
    "eval_batch_size": "loader.eval_batch_size",
    "num_workers": "loader.num_workers",
    "pin_memory": "loader.pin_memory",
}



def check_settings(
    transforms: Union[ImageTransforms, Mapping[str, Any]], loader: Union[Loaders, Mapping[str, Any], None] = None
) -> tuple[ImageTransforms, Loaders]:
    """The settings as dataclasses: a mapping (a Python caller's ``loader={"batch_size": 8}``) is
    built into one; anything else is a ``TypeError`` that names the expected type."""
    out: list[Any] = []
    for name, value, cls in (("transforms", transforms, ImageTransforms), ("loader", loader if loader is not None else Loaders(), Loaders)):
        if isinstance(value, Mapping):
            value = cls(**value)
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__} (vlm.datamodules.settings) or a mapping of its fields, got {type(value).__name__}.")
        out.append(value)
    return out[0], out[1]


def train_transform(settings: ImageTransforms) -> Callable[[Any], Any]:
    """The training transform of ``settings`` (Dassl's pipeline by name)."""
    return build_train_transform(settings.image_size, list(settings.train), settings.mean, settings.std,
                                 crop_scale=settings.crop_scale)  # fmt: skip


def test_transform(settings: ImageTransforms) -> Callable[[Any], Any]:
    """The evaluation transform of ``settings``: resize, centre crop, normalise iff training does."""
    return build_test_transform(settings.image_size, settings.mean, settings.std, normalize=settings.normalize)


def settings_hparams(**settings: Any) -> dict[str, dict[str, Any]]:
    """The settings as plain dicts, for a datamodule's ``save_hyperparameters`` (which it calls with
    ``ignore=SETTINGS`` first): the hyper-parameters Lightning writes into every checkpoint then hold
    no pickled object, so a checkpoint still loads with ``torch.load(weights_only=True)``."""
    classes = {"transforms": ImageTransforms, "loader": Loaders}
    out: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        value = classes[key](**value) if isinstance(value, Mapping) else value  # a Python caller's mapping
        out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


#: the datamodule arguments :func:`settings_hparams` records
SETTINGS = ["transforms", "loader"]
