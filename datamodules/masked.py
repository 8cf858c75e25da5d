"""Images with foreground masks (for learners that decouple foreground and background; Zhang et
al., TPAMI 2025): reading, paired transforms, data.

Such a learner decouples every training image x into a foreground view x*M and a background view
x*(1-M) (paper Sec. 3, "decouple"), with M a per-image segmentation mask. The official code
(its segmentation-mask variant) reads SEEM masks from disk and pushes image and mask through the *same* random-resized-crop and
flip (its pair transforms), then binarises the mask. This module does the same.

On-disk mask format (documented here, converted once from the official per-dataset download):

* one mask per training image at ``<mask_root>/<image path relative to the image root>``, with
  the image's suffix replaced by ``mask_ext`` (``.png`` by default). Example: image
  ``<root>/images/abyssinian_1.jpg`` -> mask ``<mask_root>/abyssinian_1.png``;
* a single-channel 8-bit image (PIL mode ``L``, ``P`` or ``1``; RGB is converted to ``L``) of
  the same size as the image. Value 0 is background; any other value is foreground, except
  ``void_value`` (255 by default), which counts as background, as the official pair transform
  maps 255 to 0 and every other value above 0 to 1. Set ``void_value=None`` for 0/255 masks.

The mask is binarised *before* the geometric transform and resized with ``nearest`` interpolation
by default, so label boundaries stay sharp. The official code resizes the label map with the
image's bicubic interpolation and binarises afterwards (``prompt-learners.md`` §3.7, pitfall 4);
``mask_interpolation="bicubic"`` resizes the binary mask bicubically and thresholds at 0.5, which
is close to, not identical with, that order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from vlm.datamodules.fewshot_datamodule import FewShotDataModule
from vlm.datamodules.image_list import CollateSkipCorrupt, ImageListDataset, OnCorrupt
from vlm.datamodules.settings import ImageTransforms, Loaders, SETTINGS, settings_hparams
from vlm.datamodules.splits import Datum
from vlm.datamodules.transforms import (
    AVAILABLE_TRAIN_TRANSFORMS,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_TRAIN_TRANSFORMS,
    CorruptImageError,
    _interpolation,
    load_image,
    strict_decoding,
)

RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default, as Dassl uses it


def read_mask(path: str | Path, void_value: Optional[int] = 255) -> Image.Image:
    """Read a mask file and binarise it: ``L`` image with 255 = foreground, 0 = background."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Mask '{path}' does not exist. Segmentation masks live at <mask_root>/<image relpath with the mask suffix> "
            "(see vlm.datamodules.masked); use the learner's CLS-attention mask source (masks from the frozen "
            "CLIP) when no masks are available."
        )
    with Image.open(path) as img, strict_decoding():
        img.load()
        arr = np.asarray(img.convert("L") if img.mode not in ("L", "P", "1") else img).astype(np.int64)
    fg = arr > 0
    if void_value is not None:
        fg &= arr != void_value
    return Image.fromarray((fg * 255).astype(np.uint8), mode="L")


class PairedTrainTransform:
    """Dassl's train pipeline (same names and order as ``build_train_transform``) applied to an
    image and its mask with shared random parameters.

    The random draws happen in the same order as torchvision's own transforms (crop parameters,
    then the flip coin), so under one seed the image is exactly what ``build_train_transform``
    gives. Returns ``(image [3, H, W] float, mask [1, H, W] float in {0, 1})``; the mask is never
    normalised.
    """

    def __init__(
        self,
        size: int = 224,
        names: Sequence[str] = DEFAULT_TRAIN_TRANSFORMS,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        crop_scale: Sequence[float] = (0.08, 1.0),
        interpolation: str = "bicubic",
        mask_interpolation: str = "nearest",
        crop_padding: int = 4,
    ) -> None:
        unknown = [n for n in names if n not in AVAILABLE_TRAIN_TRANSFORMS]
        if unknown:
            raise ValueError(f"Unknown train transform(s) {unknown}; available: {list(AVAILABLE_TRAIN_TRANSFORMS)}.")
        if mask_interpolation not in ("nearest", "bicubic", "bilinear"):
            raise ValueError(f"mask_interpolation must be nearest, bilinear or bicubic; got {mask_interpolation!r}.")
        self.size, self.names = size, tuple(names)
        self.mean, self.std = list(mean), list(std)
        self.crop_scale = tuple(crop_scale)
        self.interp = _interpolation(interpolation)
        self.mask_interp = _interpolation(mask_interpolation)
        self.crop_padding = crop_padding

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        if image.size != mask.size:
            raise ValueError(f"Image size {image.size} and mask size {mask.size} differ; masks must match their image.")
        s = self.size
        if "random_crop" not in self.names and "random_resized_crop" not in self.names:
            image = TF.resize(image, [s, s], interpolation=self.interp)
            mask = TF.resize(mask, [s, s], interpolation=self.mask_interp)
        if "random_crop" in self.names:
            image = TF.pad(image, self.crop_padding)
            mask = TF.pad(mask, self.crop_padding)
            i, j, h, w = T.RandomCrop.get_params(image, (s, s))
            image, mask = TF.crop(image, i, j, h, w), TF.crop(mask, i, j, h, w)
        if "random_resized_crop" in self.names:
            i, j, h, w = T.RandomResizedCrop.get_params(image, list(self.crop_scale), list(RRC_RATIO))
            image = TF.resized_crop(image, i, j, h, w, [s, s], interpolation=self.interp, antialias=True)
            mask = TF.resized_crop(mask, i, j, h, w, [s, s], interpolation=self.mask_interp, antialias=True)
        if "random_flip" in self.names and torch.rand(1) < 0.5:
            image, mask = TF.hflip(image), TF.hflip(mask)
        img_t = TF.to_tensor(image)
        if "normalize" in self.names:
            img_t = TF.normalize(img_t, self.mean, self.std)
        mask_t = (TF.to_tensor(mask) > 0.5).float()
        return img_t, mask_t


def mask_path(datum: Datum, image_root: Path, mask_root: Path, mask_ext: str = ".png") -> Path:
    """Where the mask of ``datum`` lives (the module docstring's layout)."""
    rel = Path(datum.impath).resolve().relative_to(Path(image_root).resolve())
    return Path(mask_root) / rel.with_suffix(mask_ext)


class MaskedImageListDataset(ImageListDataset):
    """``ImageListDataset`` that also yields ``"mask"`` (``[1, H, W]`` float 0/1), transformed with
    the image by a :class:`PairedTrainTransform`."""

    def __init__(
        self,
        items: Sequence[Datum],
        transform: PairedTrainTransform,
        image_root: Path,
        mask_root: Path,
        mask_ext: str = ".png",
        void_value: Optional[int] = 255,
        on_corrupt: OnCorrupt = "fail",
        name: str = "dataset",
    ) -> None:
        super().__init__(items, transform, on_corrupt=on_corrupt, name=name)  # type: ignore[arg-type]
        self.image_root, self.mask_root = Path(image_root), Path(mask_root)
        self.mask_ext, self.void_value = mask_ext, void_value

    def mask_path(self, index: int) -> Path:
        return mask_path(self.items[index], self.image_root, self.mask_root, self.mask_ext)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            image = load_image(item.impath)
        except CorruptImageError:
            if self.on_corrupt == "fail":
                raise
            self._corrupt[index] = True
            return None
        mask = read_mask(self.mask_path(index), self.void_value)
        img_t, mask_t = self.transform(image, mask)
        return {
            "image": img_t,
            "label": torch.tensor(item.label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "mask": mask_t,
        }


class CollateMasked(CollateSkipCorrupt):
    """``CollateSkipCorrupt`` whose all-skipped batch also carries an empty ``"mask"``."""

    def __call__(self, batch: list[dict[str, Any] | None]) -> dict[str, Tensor]:
        out = super().__call__(batch)
        if "mask" not in out:
            out["mask"] = torch.empty((0, 1, *self.image_shape[1:]))
        return out


class MaskedFewShotDataModule(FewShotDataModule):
    """``FewShotDataModule`` whose training batches are ``{"image", "label", "index", "mask"}``.

    Validation, test and predict batches carry no mask (the masks are used in training only).

    Args:
        root, dataset: as :class:`FewShotDataModule` (optional here only so that a config fragment can
            switch the class after a ``configs/data/<name>.yaml`` that sets them; required at runtime).
        mask_root: folder of the masks, laid out as the module docstring says; default
            ``<root>/mask`` (where the official code reads its SEEM masks).
        mask_ext: mask file suffix.
        void_value: mask value that counts as background besides 0 (official: 255); None: none.
        mask_interpolation: ``nearest`` (default, sharp) or ``bicubic`` (closer to the official code).
        Other arguments: as :class:`FewShotDataModule`.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        dataset: Optional[str] = None,
        mask_root: Optional[str] = None,
        mask_ext: str = ".png",
        void_value: Optional[int] = 255,
        mask_interpolation: str = "nearest",
        image_dir: str = "images",
        num_shots: int = 16,
        seed: int = 1,
        subsample: str = "base",
        test_subsets: Sequence[str] = ("base", "new"),
        transforms: ImageTransforms = ImageTransforms(),
        loader: Loaders = Loaders(),
        template: str = "a photo of a {}.",
        strict_shots: bool = False,
        on_corrupt: OnCorrupt = "fail",
        check_files: bool = True,
        fewshot_cache_dir: Optional[str] = None,
        split_file: Optional[str] = None,
    ) -> None:
        if root is None or dataset is None:
            raise ValueError(
                "MaskedFewShotDataModule needs root and dataset: compose it after a configs/data/<name>.yaml "
                "(which sets them) or pass them."
            )
        super().__init__(
            root=root, dataset=dataset, image_dir=image_dir, num_shots=num_shots, seed=seed, subsample=subsample,
            test_subsets=test_subsets, transforms=transforms, loader=loader, template=template, strict_shots=strict_shots,
            on_corrupt=on_corrupt, check_files=check_files, fewshot_cache_dir=fewshot_cache_dir, split_file=split_file,
        )  # fmt: skip
        self.save_hyperparameters(ignore=SETTINGS)
        self.save_hyperparameters(settings_hparams(transforms=transforms, loader=loader))
        self.mask_root = Path(mask_root).expanduser() if mask_root else self.root / "mask"
        self.mask_ext, self.void_value, self.mask_interpolation = mask_ext, void_value, mask_interpolation

    def _dataset(self, items: list[Datum], train: bool, name: str) -> ImageListDataset:
        if not train:
            return super()._dataset(items, train, name)
        t = self.transforms
        tf = PairedTrainTransform(t.image_size, t.train, t.mean, t.std, crop_scale=t.crop_scale, mask_interpolation=self.mask_interpolation)
        if self.check_files:
            missing = [str(mask_path(d, self.image_root, self.mask_root, self.mask_ext)) for d in items]
            missing = [p for p in missing if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} training mask(s) missing under '{self.mask_root}', e.g. {missing[:3]}.")
        return MaskedImageListDataset(
            items, tf, self.image_root, self.mask_root, self.mask_ext, self.void_value,
            on_corrupt=self.on_corrupt, name=f"{self.dataset}/{name}",
        )  # fmt: skip

    def _collate(self, ds: ImageListDataset) -> Callable[[list], Any]:
        if isinstance(ds, MaskedImageListDataset):
            return CollateMasked((3, self.transforms.image_size, self.transforms.image_size))
        return super()._collate(ds)
