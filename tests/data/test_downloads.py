"""torchvision downloads: every wired dataset passes download=True to a real torchvision class, under the
folder its reader reads; the HTA DTD / Food-101 / GTSRB / SVHN paths run end to end on offline archives."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torchvision.datasets as tvd

from tests.data.fake_archives import patch_downloads
from tests.distributed.helpers import REPO
from vlm.datamodules import DatasetLayoutError, available_datasets, get_dataset
from vlm.datamodules.downloads import NO_DOWNLOAD, TorchvisionDownload, download_support, no_download_reason

WIRED = [n for n in available_datasets() if isinstance(get_dataset(n).download, TorchvisionDownload)]


def _prepare_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlm_prepare_downloads", REPO / "scripts" / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dataset_is_wired_or_says_why_not() -> None:
    for name in available_datasets():
        spec = get_dataset(name)
        wired = isinstance(spec.download, TorchvisionDownload)
        assert wired != (no_download_reason(name) is not None), name
        assert (spec.prepare is not None) if wired else spec.download is None, name
        assert download_support(spec).startswith("torchvision.datasets." if wired else "no: ")
    assert set(NO_DOWNLOAD) <= set(available_datasets())
    assert {"hta_dtd", "hta_food101", "hta_gtsrb", "hta_svhn", "hta_flowers", "dtd", "food101"} <= set(WIRED)


@pytest.mark.parametrize("name", WIRED)
def test_prepare_download_passes_download_true(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_dataset(name)
    calls: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def __init__(self, root: str, **kwargs: Any) -> None:
            calls.append((root, kwargs))

    monkeypatch.setattr(tvd, spec.download.cls_name, Recorder)
    try:
        spec.prepare(tmp_path, spec, True)
    except DatasetLayoutError:
        pass  # the recorder wrote nothing, so a split cannot be generated; the call is what is checked
    target = str(spec.download.target(tmp_path))
    assert calls == [(target, {"download": True, **dict(kw)}) for kw in spec.download.calls]
    calls.clear()
    try:
        spec.prepare(tmp_path, spec, False)
    except DatasetLayoutError:
        pass
    assert calls == []  # without --download nothing is fetched


@pytest.mark.parametrize(
    "name,module,archives,counts",
    [
        ("hta_dtd", tvd.dtd, ["dtd-r1.0.1.tar.gz"], {"train": 6, "val": 4, "test": 4}),
        ("hta_food101", tvd.food101, ["food-101.tar.gz"], {"train": 8, "val": 2, "test": 4}),
        ("hta_gtsrb", tvd.gtsrb, ["GTSRB-Training_fixed.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip"],
         {"train": 8, "val": 2, "test": 4}),
        ("hta_svhn", tvd.svhn, ["train_32x32.mat", "test_32x32.mat"], {"train": 8, "val": 2, "test": 3}),
    ],
)  # fmt: skip
def test_download_then_read_end_to_end(
    name: str, module: ModuleType, archives: list[str], counts: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real torchvision class unpacks (offline stand-in archives) where the reader then finds the files."""
    fetched = patch_downloads(monkeypatch, module)
    if hasattr(module, "check_integrity"):  # md5 of the real archives; the stand-ins only need to exist
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    prepare = _prepare_script()
    with pytest.raises(DatasetLayoutError):
        prepare.check(name, tmp_path, download=False)
    assert fetched == []
    assert prepare.check(name, tmp_path, download=True) == counts
    assert fetched == archives
    assert prepare.check(name, tmp_path, download=True) == counts
    assert fetched == archives  # a second --download finds the files and fetches nothing


def test_list_shows_download_support(capsys: pytest.CaptureFixture[str]) -> None:
    _prepare_script().main(["list"])
    out = capsys.readouterr().out
    assert "download: torchvision.datasets.GTSRB into <root>/GTSRB ({'split': 'train'}, {'split': 'test'})" in out
    assert "download: no: torchvision.datasets.StanfordCars.download raises" in out


@pytest.mark.parametrize("name,sub", [("fgvc_flowers", "."), ("hta_flowers", "102flowers")])
def test_flowers_read_from_torchvision_folder(name: str, sub: str, tmp_path: Path) -> None:
    """VPT's JSON keys (`jpg/<file>`) resolve under torchvision's `flowers-102/` when the images are there."""
    from tests.data.layouts import write_layout

    expected = write_layout(name, tmp_path)
    base = tmp_path / sub
    (base / "flowers-102").mkdir()
    folders = {rel.split("/")[0] for rel in json.loads((base / "train.json").read_text())}
    for folder in folders:  # the image folders the JSON keys start with move to torchvision's place
        (base / folder).rename(base / "flowers-102" / folder)
    split = get_dataset(name).read(tmp_path)
    assert {k: len(v) for k, v in split.items()} == expected.counts
    assert all(Path(d.impath).is_file() and "/flowers-102/" in d.impath for v in split.values() for d in v)


def test_docs_table_matches_the_registry() -> None:
    """docs/data.md has one row per registered dataset with the download support and command the code gives."""
    doc = (REPO / "docs" / "data.md").read_text()
    for name in available_datasets():
        spec = get_dataset(name)
        cmd = spec.prepare_command("<root>").replace("python scripts/data/prepare.py ", "")
        assert f"| `{name}` | {spec.family} | {download_support(spec)} | `{cmd}` |" in doc, name
    assert doc.count("\n| `") == len(available_datasets())
