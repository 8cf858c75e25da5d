"""The episodic few-shot protocol: sampler counts, layouts, the CI formula, and fit/test end to end."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_clip_cfg
from vlm.backbones import ClipBackbone
from vlm.datamodules import EpisodeSampler, EpisodicDataModule, MNISTEpisodicDataModule
from vlm.metrics import mean_ci95
from vlm.modules import EpisodicClassifier
from vlm.modules.episodic import episode_logits
from vlm.modules.optim import OptimConfig
from vlm.prompts.ktpp import KTPP


def indices(sampler: EpisodeSampler) -> list[list[int]]:
    """The dataset indices of each episode (the sampler also yields each sample's augmentation seed)."""
    return [[x.index for x in ep] for ep in sampler]


def test_sampler_2000_episodes_counts():
    labels = np.repeat(np.arange(20), 30).tolist()  # 20 novel classes, 30 images each
    for shot in (1, 5):
        sampler = EpisodeSampler(labels, way=5, shot=shot, query=15, episodes=2000, seed=0)
        episodes = indices(sampler)
        assert len(episodes) == len(sampler) == 2000
        for ep in episodes[:200] + episodes[-50:]:
            assert len(ep) == 5 * (shot + 15) and len(set(ep)) == len(ep)
            support, query = ep[: 5 * shot], ep[5 * shot :]
            classes = [labels[i] for i in support[::shot]]
            assert len(set(classes)) == 5
            assert [labels[i] for i in support] == [c for c in classes for _ in range(shot)]
            assert [labels[i] for i in query] == [c for c in classes for _ in range(15)]
        assert episodes == indices(EpisodeSampler(labels, 5, shot, 15, 2000, seed=0))  # fixed test episodes
    sampler.set_epoch(1)
    assert indices(sampler)[0] != episodes[0]
    counts = Counter(labels[i] for ep in episodes for i in ep[::20])
    assert len(counts) == 20  # every class gets drawn


def test_confidence_interval_and_prototype_logits():
    accs = torch.tensor([60.0, 80.0, 70.0, 90.0])
    mean, ci = mean_ci95(accs)
    assert mean_ci95(accs.tolist()) == (mean, ci)
    std = math.sqrt(sum((a - 75.0) ** 2 for a in accs.tolist()) / 3)
    assert mean == 75.0 and abs(ci - 1.96 * std / 2) < 1e-6
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 1.2]])  # way 2, shot 2
    logits = episode_logits(feats, way=2, shot=2, temperature=0.5)
    q = torch.tensor([1.0, 1.2]) / torch.tensor([1.0, 1.2]).norm()
    torch.testing.assert_close(logits, torch.stack([q[0], q[1]])[None] / 0.5)


def _image_folder(root: Path) -> None:
    rng = np.random.RandomState(0)
    for split, classes in (("base", ["ant", "bee", "cat"]), ("val", ["dog", "eel"]), ("novel", ["fox", "gnu", "hen"])):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_layout_batches(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "classnames.txt").write_text("ant red ant\nfox arctic_fox\n")
    dm = EpisodicDataModule(str(tmp_path), way=2, shot=1, query=2, train_episodes=3, val_episodes=2, test_episodes=4, transforms={"image_size": 8})
    assert dm.classnames == ["red ant", "bee", "cat", "dog", "eel", "arctic fox", "gnu", "hen"]
    dm.setup()
    batches = list(dm.test_dataloader())
    assert len(batches) == 4
    b = batches[0]
    assert b["image"].shape == (6, 3, 8, 8) and b["episode"].tolist() == [2, 1, 2]
    assert b["episode_label"].tolist() == [0, 1, 0, 0, 1, 1]
    assert set(b["label"].tolist()) <= {5, 6, 7}  # novel classes only, global labels
    assert set(next(iter(dm.train_dataloader()))["label"].tolist()) <= {0, 1, 2}


def test_stored_episodes_are_replayed(tmp_path):
    """``episodes_dir``: val/test episodes are written once as index files and replayed (one sampler)."""
    _image_folder(tmp_path / "data")
    kw = dict(way=2, shot=1, query=2, train_episodes=3, val_episodes=2, test_episodes=4, transforms={"image_size": 8})
    plain = EpisodicDataModule(str(tmp_path / "data"), **kw)
    stored = EpisodicDataModule(str(tmp_path / "data"), episodes_dir=str(tmp_path / "eps"), **kw)
    plain.setup(), stored.setup()
    assert len(list((tmp_path / "eps" / "episodes").glob("*.json"))) == 2  # val and test
    assert indices(stored.samplers["test"]) == indices(plain.samplers["test"])  # same draws as the sampler
    again = EpisodicDataModule(str(tmp_path / "data"), episodes_dir=str(tmp_path / "eps"), **kw)
    again.setup()
    assert again.samplers["test"].fixed == stored.samplers["test"].fixed
    assert stored.template == "a photo of a {}."


def test_ktpp_fit_and_test_on_mnist_episodes(tmp_path):
    """KTPP through episodes on the offline digits: meta-train on zero..four, test on five..nine."""
    dm = MNISTEpisodicDataModule(shot=1, query=2, train_episodes=3, val_episodes=2, test_episodes=6, transforms={"image_size": 32})
    assert dm.classnames[:2] == ["zero", "one"]
    torch.manual_seed(0)
    bb = ClipBackbone("tiny", model_cfg=tiny_clip_cfg(layers=3))
    model = EpisodicClassifier(bb, prompt_learner=KTPP(stage_topk=(1.0, 0.5, 0.25), pyramid_grids=(2, 2, 1)),
                               optim=OptimConfig(name="adamw", lr=0.01, weight_decay=0.0))  # fmt: skip
    before = [p.detach().clone() for p in model.prompt_learner.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.prompt_learner.parameters()))
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert metrics["test/episodes"] == 6.0
    per_episode = model.result_extras()["episode_acc"]  # what results.json gets, for paired comparisons
    assert len(per_episode) == 6 and all(abs(a / 10 - round(a / 10)) < 1e-5 for a in per_episode)  # 10 queries each
    assert (sum(per_episode) / 6, mean_ci95(per_episode)[1]) == pytest.approx((metrics["test/acc"], metrics["test/ci95"]), abs=1e-4)
    model.cache_eval_features = False  # the eval feature cache is exact: same metrics without it
    again = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert again["test/acc"] == pytest.approx(metrics["test/acc"]) and again["test/ci95"] == pytest.approx(metrics["test/ci95"])
    assert set(model.state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}
