"""FewShotDataModule: init-time class names, loaders, subsets, errors, and LightningCLI use."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from vlm.runtime.cli import VLMCLI
from vlm.datamodules.fewshot import sample_fewshot, subsample_classes
from vlm.datamodules.fewshot_datamodule import FewShotDataModule
from vlm.datamodules.splits import read_split
from tests.datamodules.toydata import CLASSNAMES, TEST_COUNTS
from tests.helpers import data_args


def make_dm(root: Path, **kwargs: object) -> FewShotDataModule:
    args: dict[str, object] = dict(root=str(root), dataset="Toy", num_shots=4, image_size=8, batch_size=4)
    args.update(kwargs)
    return FewShotDataModule(**data_args(**args))  # type: ignore[arg-type]


def test_classnames_at_init(toy_root: Path) -> None:
    dm = make_dm(toy_root)
    assert dm.classnames == ["cat", "dog", "golden_retriever"]
    assert dm.test_subsets == ["base", "new"]
    assert dm.test_classnames == {"base": ["cat", "dog", "golden_retriever"], "new": ["owl", "eel"]}
    assert dm.num_classes == 3 and dm.num_test_classes("new") == 2
    assert dm.prompts()[2] == "a photo of a golden retriever."
    assert dm.prompts("new") == ["a photo of a owl.", "a photo of a eel."]
    assert make_dm(toy_root, subsample="new").classnames == ["owl", "eel"]
    assert make_dm(toy_root, subsample="all").classnames == CLASSNAMES
    assert not (toy_root / "split_fewshot").exists()  # init only reads the split file


def test_fit_data(toy_root: Path) -> None:
    dm = make_dm(toy_root, seed=2)
    dm.prepare_data()
    assert (toy_root / "split_fewshot" / "shot_4-seed_2.json").is_file()
    dm.setup("fit")
    split = read_split(toy_root / "split_zhou_Toy.json", toy_root / "images")
    want_train, want_val = subsample_classes(*sample_fewshot(split["train"], split["val"], 4, 2), subsample="base")
    assert dm.train_set is not None and dm.val_set is not None
    assert dm.train_set.items == want_train and dm.val_set.items == want_val
    assert len(want_train) == 12 and len(want_val) == 11  # 4+4+4 train; val: min(4, n) = 4+3+4
    batches = list(dm.train_dataloader())
    b = batches[0]
    assert set(b) == {"image", "label", "index"}
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.long and b["index"].dtype == torch.long
    assert sorted(torch.cat([x["index"] for x in batches]).tolist()) == list(range(12))
    labels = torch.cat([x["label"] for x in dm.val_dataloader()])
    assert labels.tolist() == [d.label for d in want_val] and labels.max() == 2


def test_test_loaders_in_subset_order(toy_root: Path) -> None:
    dm = make_dm(toy_root, test_subsets=["new", "all", "base"], eval_batch_size=3)
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert dm.test_subsets == ["new", "all", "base"] and len(loaders) == 3
    sizes = [len(loader.dataset) for loader in loaders]
    base = TEST_COUNTS[0] + TEST_COUNTS[1] + TEST_COUNTS[2]
    assert sizes == [TEST_COUNTS[3] + TEST_COUNTS[4], sum(TEST_COUNTS.values()), base]
    new_items = loaders[0].dataset.items
    assert {(d.classname, d.label) for d in new_items} == {("owl", 0), ("eel", 1)}
    for subset, loader in zip(dm.test_subsets, loaders):
        names = dm.test_classnames[subset]
        assert all(names[d.label] == d.classname for d in loader.dataset.items)
        assert sum(len(b["label"]) for b in loader) == len(loader.dataset)


def test_predict_and_full_shots(toy_root: Path) -> None:
    dm = make_dm(toy_root, num_shots=0, subsample="all")
    dm.setup()
    assert len(dm.train_set) == len(read_split(toy_root / "split_zhou_Toy.json", toy_root)["train"])
    assert not (toy_root / "split_fewshot").exists()
    labels = torch.cat([b["label"] for b in dm.predict_dataloader()])
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]


def test_image_dir_and_split_file_options(tmp_path: Path, dataset_factory) -> None:
    root = dataset_factory("flat", image_dir="")
    dm = make_dm(root, image_dir=".", fewshot_cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert (tmp_path / "cache" / "shot_4-seed_1.json").is_file()
    moved = tmp_path / "elsewhere.json"
    moved.write_text((root / "split_zhou_Toy.json").read_text())
    dm2 = FewShotDataModule(root=str(root), dataset="Other", image_dir="", split_file=str(moved), transforms={"image_size": 8})
    assert dm2.classnames == dm.classnames


def test_missing_root_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Dataset root .* does not exist.*Expected layout"):
        make_dm(tmp_path / "missing")


def test_missing_images_error_at_setup(toy_root: Path) -> None:
    (toy_root / "images" / "eel" / "test_3.png").unlink()
    dm = make_dm(toy_root)
    dm.setup("fit")  # train/val are complete
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images .*eel/test_3\.png"):
        dm.setup("test")


def test_strict_shots_and_bad_args(toy_root: Path) -> None:
    with pytest.raises(ValueError, match=r"Class 4 \('eel'\) has only 2 train examples"):
        make_dm(toy_root, strict_shots=True).prepare_data()
    with pytest.raises(ValueError, match="Class subsets are"):
        make_dm(toy_root, test_subsets=["novel"])


def test_skip_corrupt_images(toy_root: Path) -> None:
    path = toy_root / "images" / "cat" / "test_0.png"
    path.write_bytes(path.read_bytes()[:40])
    dm = make_dm(toy_root, on_corrupt="skip", test_subsets=["base"])
    dm.setup("test")
    with pytest.warns(UserWarning, match="Skipping corrupt image"):
        n = sum(len(b["label"]) for b in dm.test_dataloader()[0])
    assert n == TEST_COUNTS[0] + TEST_COUNTS[1] + TEST_COUNTS[2] - 1
    assert dm.skipped_images() == [str(path)]


class TinyClassifier(L.LightningModule):
    """A linear probe on flattened 8x8 images, taking class names from the datamodule link."""

    def __init__(self, classnames: list[str] | None = None) -> None:
        super().__init__()
        self.classnames = classnames or []
        self.head = torch.nn.Linear(3 * 8 * 8, max(len(self.classnames), 1))
        self.seen_test: list[int] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(batch["image"].flatten(1)), batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.training_step(batch, batch_idx))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.seen_test.append(dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_vlm_cli_links_classnames_from_the_data(toy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["vlm"])
    config = {
        "model": {"class_path": f"{__name__}.TinyClassifier"},
        "data": {"class_path": "vlm.datamodules.FewShotDataModule",
                 "init_args": {"root": str(toy_root), "dataset": "Toy", "num_shots": 2,
                               "transforms": {"image_size": 8, "train": ["random_resized_crop", "normalize"]},
                               "test_subsets": ["base", "new"]}},
        "trainer": {"max_epochs": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(config))
    # vlm's own CLI (vlm.runtime.links): the model's classnames come from the data config, not from the model's
    cli = VLMCLI(args=["--config", str(cfg_path)], run=False, save_config_callback=None)
    assert cli.model.classnames == ["cat", "dog", "golden_retriever"]
    assert cli.datamodule.transforms.train == ("random_resized_crop", "normalize")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert sorted(set(cli.model.seen_test)) == [0, 1]
