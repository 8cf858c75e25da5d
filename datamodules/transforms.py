"""CLIP preprocessing as Dassl/CoOp build it, and image loading with clear errors.

Train (Dassl `_build_transform_train`, names as in `INPUT.TRANSFORMS`): a plain resize to
size x size unless a crop is listed, `random_crop` (padding 4), `random_resized_crop` (scale
(0.08, 1), bicubic), then `random_flip`, ToTensor and, if listed, `normalize` (CLIP mean/std by default).
Test (`_build_transform_test`): resize the shorter side to `size` (bicubic), center-crop `size`,
ToTensor and `normalize` if the train list has it. Images are converted to RGB, as Dassl's
`read_image` does; 16-bit and float greyscale images (`I;16`, `I`, `F`) are first scaled to 8 bits
by `to_rgb` (PIL's own conversion clips them, turning most 16-bit images white).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile
from torchvision import transforms as T

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TRAIN_TRANSFORMS: tuple[str, ...] = ("random_resized_crop", "random_flip", "normalize")
AVAILABLE_TRAIN_TRANSFORMS: tuple[str, ...] = ("random_resized_crop", "random_crop", "random_flip", "normalize")
_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated or not an image)."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(
            f"Cannot decode image '{path}' ({type(cause).__name__}: {cause}). The file is corrupt or "
            "truncated: re-download it, drop it from the split, or set on_corrupt='skip' to skip and count such files."
        )
        self.path = path


@contextmanager
def strict_decoding() -> Iterator[None]:
    """PIL raises on a truncated file while inside, whatever the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` says: other libraries turn it on for the whole process
    (lmms-eval's task module does on import), which would make a truncated image load silently,
    padded with grey."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully (so truncation surfaces here, not later; :func:`strict_decoding`) and
    convert it to RGB."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image '{path}' does not exist (listed in the split but missing on disk).")
    try:
        with Image.open(path) as img, strict_decoding():
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(path, e) from e


def _decode_error(path: str) -> str | None:
    """``None`` when ``path`` decodes as the loaders decode it (:func:`load_image`), else why not."""
    try:
        load_image(path)
    except OSError as err:  # CorruptImageError, FileNotFoundError
        return str(err)
    return None


def decode_errors(paths: Sequence[str], workers: int = 1) -> list[tuple[str, str]]:
    """``(path, message)`` for each of ``paths`` that :func:`load_image` cannot decode, decoding
    with ``workers`` processes (``scripts/data/prepare.py check --decode``)."""
    paths = list(paths)
    if workers > 1 and len(paths) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            errors = list(pool.map(_decode_error, paths, chunksize=max(1, len(paths) // (workers * 16))))
    else:
        errors = [_decode_error(p) for p in paths]
    return [(p, e) for p, e in zip(paths, errors) if e is not None]


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB with its real intensities.

    ``I;16*`` (16-bit greyscale PNG/TIFF) is scaled by 255 / 65535. ``I`` (32-bit integers, how some
    Pillow versions open 16-bit PNGs) is taken as 16-bit when its maximum exceeds 255, else as 8-bit.
    ``F`` (float) is taken as [0, 1] when its maximum is at most 1, else as [0, 255]. Other modes use
    PIL's ``convert("RGB")``.
    """
    mode = img.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
        arr = arr * (255.0 / 65535.0)
    elif mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _interpolation(name: str) -> T.InterpolationMode:
    """Map an interpolation name to torchvision's enum, listing the choices on a typo."""
    if name not in _INTERPOLATION:
        raise ValueError(f"Unknown interpolation {name!r}; choose one of {sorted(_INTERPOLATION)}.")
    return _INTERPOLATION[name]


def build_train_transform(
    size: int = 224,
    names: Sequence[str] = DEFAULT_TRAIN_TRANSFORMS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop_scale: Sequence[float] = (0.08, 1.0),
    interpolation: str = "bicubic",
    crop_padding: int = 4,
) -> T.Compose:
    """Dassl's train pipeline from a list of transform names (order follows Dassl, not the list)."""
    unknown = [n for n in names if n not in AVAILABLE_TRAIN_TRANSFORMS]
    if unknown:
        raise ValueError(f"Unknown train transform(s) {unknown}; available: {list(AVAILABLE_TRAIN_TRANSFORMS)}.")
    interp = _interpolation(interpolation)
    steps: list[object] = []
    if "random_crop" not in names and "random_resized_crop" not in names:
        steps.append(T.Resize((size, size), interpolation=interp))
    if "random_crop" in names:  # as Dassl: crops the decoded image directly (padding, no resize)
        steps.append(T.RandomCrop(size, padding=crop_padding))
    if "random_resized_crop" in names:
        steps.append(T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=interp))
    if "random_flip" in names:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    if "normalize" in names:
        steps.append(T.Normalize(mean=list(mean), std=list(std)))
    return T.Compose(steps)


def build_test_transform(
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    normalize: bool = True,
    interpolation: str = "bicubic",
) -> T.Compose:
    """Dassl's test pipeline: shorter side to `size`, center crop, ToTensor, optional normalize."""
    steps: list[object] = [
        T.Resize(size, interpolation=_interpolation(interpolation)),
        T.CenterCrop(size),
        T.ToTensor(),
    ]
    if normalize:
        steps.append(T.Normalize(mean=list(mean), std=list(std)))
    return T.Compose(steps)
