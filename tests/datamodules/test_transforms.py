"""CLIP/Dassl preprocessing, image loading, and corrupt-image handling."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from vlm.datamodules.image_list import CollateSkipCorrupt, ImageListDataset
from vlm.datamodules.splits import Datum
from vlm.datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CorruptImageError,
    build_test_transform,
    build_train_transform,
    load_image,
)
from tests.datamodules.toydata import write_image


def test_default_train_pipeline_is_dassl_clip() -> None:
    steps = build_train_transform(224).transforms
    assert [type(s) for s in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    rrc, norm = steps[0], steps[3]
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0)
    assert rrc.interpolation == T.InterpolationMode.BICUBIC
    assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_train_pipeline_by_names() -> None:
    no_flip = build_train_transform(32, ["random_resized_crop", "normalize"], crop_scale=(0.5, 1.0)).transforms
    assert [type(s) for s in no_flip] == [T.RandomResizedCrop, T.ToTensor, T.Normalize]
    assert no_flip[0].scale == (0.5, 1.0)
    plain = build_train_transform(32, ["random_flip"]).transforms
    assert [type(s) for s in plain] == [T.Resize, T.RandomHorizontalFlip, T.ToTensor]
    assert plain[0].size == (32, 32)
    crop = build_train_transform(32, ["random_crop", "normalize"]).transforms
    assert [type(s) for s in crop] == [T.RandomCrop, T.ToTensor, T.Normalize] and crop[0].padding == 4
    with pytest.raises(ValueError, match=r"Unknown train transform\(s\) \['colour'\]; available"):
        build_train_transform(32, ["colour"])
    with pytest.raises(ValueError, match="Unknown interpolation"):
        build_train_transform(32, interpolation="lanczos5")


def test_train_output(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0, size=(50, 30))
    torch.manual_seed(0)
    x = build_train_transform(24)(load_image(tmp_path / "a.png"))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32


def test_test_pipeline_matches_manual_resize_and_center_crop(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 1, size=(40, 20))
    img = load_image(tmp_path / "a.png")
    got = build_test_transform(16)(img)
    # shorter side 20 -> 16: 40x20 -> 32x16 (bicubic), then the center 16x16 crop
    manual = img.resize((32, 16), Image.BICUBIC).crop((8, 0, 24, 16))
    arr = torch.from_numpy(np.asarray(manual, dtype=np.float32) / 255.0).permute(2, 0, 1)
    expected = (arr - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    raw = build_test_transform(16, normalize=False)(img)
    torch.testing.assert_close(raw, arr, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_images_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    write_image(path, 2, mode=mode)
    img = load_image(path)
    assert img.mode == "RGB"
    assert build_test_transform(8)(img).shape == (3, 8, 8)


def _truncated_png(path: Path) -> None:
    write_image(path, 3, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_error_names_file(tmp_path: Path) -> None:
    _truncated_png(tmp_path / "broken.png")
    with pytest.raises(CorruptImageError, match=r"Cannot decode image '.*broken\.png'.*on_corrupt='skip'"):
        load_image(tmp_path / "broken.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(CorruptImageError, match=r"text\.jpg"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(FileNotFoundError, match=r"gone\.png' does not exist"):
        load_image(tmp_path / "gone.png")


def test_truncated_image_is_an_error_even_when_another_library_allows_them(tmp_path: Path, monkeypatch) -> None:
    """lmms-eval turns PIL's process-wide LOAD_TRUNCATED_IMAGES on when imported; the loaders still
    refuse a truncated file (it would load padded with grey) and leave the setting as they found it."""
    from PIL import ImageFile

    _truncated_png(tmp_path / "broken.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(CorruptImageError, match=r"broken\.png"):
        load_image(tmp_path / "broken.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def _items(tmp_path: Path, n: int, broken: set[int]) -> list[Datum]:
    items = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        if i in broken:
            _truncated_png(path)
        else:
            write_image(path, i)
        items.append(Datum(str(path), i % 2, f"c{i % 2}", path.name))
    return items


def test_fail_mode_raises_in_loader(tmp_path: Path) -> None:
    ds = ImageListDataset(_items(tmp_path, 4, {2}), build_test_transform(8))
    with pytest.raises(CorruptImageError, match=r"2\.png"):
        list(DataLoader(ds, batch_size=2, collate_fn=CollateSkipCorrupt((3, 8, 8))))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_mode_counts_in_main_process(tmp_path: Path, num_workers: int) -> None:
    ds = ImageListDataset(_items(tmp_path, 7, {1, 5}), build_test_transform(8), on_corrupt="skip")
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=CollateSkipCorrupt((3, 8, 8)))
    with pytest.warns(UserWarning, match="Skipping corrupt image") if num_workers == 0 else nullcontext():
        batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 5
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 2, 3, 4, 6]
    assert ds.num_skipped == 2
    assert [Path(p).name for p in ds.skipped_paths] == ["1.png", "5.png"]
    list(loader)  # a second epoch does not double count
    assert ds.num_skipped == 2


def test_all_skipped_batch_is_empty(tmp_path: Path) -> None:
    ds = ImageListDataset(_items(tmp_path, 2, {0, 1}), build_test_transform(8), on_corrupt="skip")
    with pytest.warns(UserWarning):
        (batch,) = list(DataLoader(ds, batch_size=2, collate_fn=CollateSkipCorrupt((3, 8, 8))))
    assert batch["image"].shape == (0, 3, 8, 8) and batch["label"].dtype == torch.long



def test_16_bit_png_loads_with_its_real_values(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG (`I;16`) scales to 8 bits; PIL's own convert("RGB") clips every value
    above 255 to white, so a normal 16-bit image would load as a white square."""
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    with Image.open(tmp_path / "depth.png") as raw:
        assert raw.mode in ("I;16", "I")
    img = load_image(tmp_path / "depth.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[0, :, :].tolist() == [[v] * 3 for v in (0, 64, 128, 255)]
