"""A map-style dataset over `Datum` lists, yielding `{"image", "label", "index"}` dicts.

`index` is the position in the list (Dassl's `DatasetWrapper` index), so evaluation can
de-duplicate the padded samples a DistributedSampler adds. With `on_corrupt="skip"` an image
that cannot be decoded is dropped from its batch by `collate_skip_corrupt` and marked in a
shared-memory flag tensor, so `skipped_paths` is right in the main process even when
DataLoader workers did the reading.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, default_collate

from vlm.datamodules.splits import Datum
from vlm.datamodules.transforms import CorruptImageError, load_image

OnCorrupt = Literal["fail", "skip"]


class ImageListDataset(Dataset):
    """Images listed as Datums, decoded with PIL (RGB) and passed through `transform`."""

    def __init__(
        self,
        items: Sequence[Datum],
        transform: Callable[[Any], torch.Tensor],
        on_corrupt: OnCorrupt = "fail",
        name: str = "dataset",
    ) -> None:
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}.")
        self.items = list(items)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.name = name
        # Shared memory: workers' writes are visible to the main process (torch pickles it by handle).
        self._corrupt = torch.zeros(len(self.items), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            image = load_image(item.impath)
        except CorruptImageError:
            if self.on_corrupt == "fail":
                raise
            if not bool(self._corrupt[index]):
                self._corrupt[index] = True
                warnings.warn(f"Skipping corrupt image '{item.impath}' in {self.name} (on_corrupt='skip').")
            return None
        return {
            "image": self.transform(image),
            "label": torch.tensor(item.label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the images skipped as corrupt so far (each counted once)."""
        return [self.items[i].impath for i in torch.nonzero(self._corrupt).flatten().tolist()]

    @property
    def num_skipped(self) -> int:
        """How many distinct images were skipped as corrupt so far."""
        return int(self._corrupt.sum())


class CollateSkipCorrupt:
    """Collate that drops `None` samples (skipped corrupt images); an all-skipped batch is empty.

    A class rather than a closure so DataLoader workers can pickle it under the spawn start method.
    """

    def __init__(self, image_shape: Sequence[int]) -> None:
        self.image_shape = tuple(image_shape)

    def __call__(self, batch: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        kept = [b for b in batch if b is not None]
        if kept:
            return default_collate(kept)
        return {
            "image": torch.empty((0, *self.image_shape)),
            "label": torch.empty(0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
        }
