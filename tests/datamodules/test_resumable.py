"""The mid-epoch-resumable training loader (datamodules/resumable.py), on its own."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlm.datamodules.episodic import EpisodeSampler
from vlm.datamodules.resumable import ResumableLoader, ResumableSampler, SeededDataset, resumable_loader


class NoisyItems(Dataset):
    """Item i is (i, one draw from the global torch generator): a stand-in for a random augmentation."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.rand(())


def batches(loader, limit=None) -> list:
    """(indices, noise) of the first ``limit`` batches (all by default), fetching no further batch."""
    return [(idx.tolist(), noise.clone()) for idx, noise in itertools.islice(loader, limit)]


def test_order_equals_a_plain_shuffled_loader() -> None:
    """One process: the same permutation as ``DataLoader(shuffle=True)`` from the same global seed."""
    torch.manual_seed(3)
    plain = [b[0] for b in batches(DataLoader(NoisyItems(10), batch_size=3, shuffle=True))]
    torch.manual_seed(3)
    ours = [b[0] for b in batches(resumable_loader(NoisyItems(10), batch_size=3))]
    assert ours == plain


def test_resume_replays_the_rest_of_the_epoch_bitwise() -> None:
    torch.manual_seed(0)
    full = batches(resumable_loader(NoisyItems(11), batch_size=3))
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(11), batch_size=3)
    head = batches(first, limit=2)
    state = first.state_dict()
    assert state["batches"] == 2 and state["epoch_seed"] is not None
    rng_before = torch.get_rng_state()
    again = resumable_loader(NoisyItems(11), batch_size=3)
    again.load_state_dict(state)
    tail = batches(again)
    assert torch.equal(torch.get_rng_state(), rng_before), "resuming must not consume global random draws"
    got = head + tail
    assert [b[0] for b in got] == [b[0] for b in full]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(got, full)), "per-sample seeded draws must repeat"
    assert again.state_dict()["batches"] == 4


def test_samples_draw_the_same_augmentation_in_any_position() -> None:
    """A sample's random draws depend on (epoch seed, index) only, not on what the loader did before."""
    torch.manual_seed(0)
    loader = resumable_loader(NoisyItems(6), batch_size=2)
    noise = {i: n for idx, ns in batches(loader) for i, n in zip(idx, ns)}
    seed = loader.sampler.epoch_seed
    again = resumable_loader(NoisyItems(6), batch_size=1)
    again.sampler.resume(seed, 0)
    torch.rand(5)  # move the global generator: no effect on the samples
    assert all(torch.equal(ns[0], noise[idx[0]]) for idx, ns in batches(again))


def test_changed_batch_size_is_a_clear_error() -> None:
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(12), batch_size=3)
    batches(first, limit=1)
    with pytest.raises(ValueError, match="batch_size 3 -> 4.*epoch-end checkpoint"):
        resumable_loader(NoisyItems(12), batch_size=4).load_state_dict(first.state_dict())


def test_epoch_end_state_starts_a_fresh_epoch() -> None:
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(6), batch_size=3)
    batches(first)
    again = resumable_loader(NoisyItems(6), batch_size=3)
    again.load_state_dict(first.state_dict())
    assert len(batches(again)) == 2


def test_ranks_split_like_distributed_sampler() -> None:
    ds = SeededDataset(NoisyItems(10))
    for rank in (0, 1):
        ours = ResumableSampler(ds, num_replicas=2, rank=rank, seed=7)
        ref = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=7)
        ours.set_epoch(2), ref.set_epoch(2)
        assert [x.index for x in ours] == list(ref)


def test_episodes_resume_mid_epoch() -> None:
    labels = [i % 4 for i in range(40)]
    ds = SeededDataset(NoisyItems(40))

    def loader() -> ResumableLoader:
        sampler = EpisodeSampler(labels, way=2, shot=1, query=2, episodes=5, seed=1)
        sampler.set_epoch(3)
        return ResumableLoader(ds, batch_sampler=sampler)

    full = batches(loader())
    first = loader()
    head = batches(first, limit=3)
    again = loader()
    again.load_state_dict(first.state_dict())
    got = head + batches(again)
    assert [b[0] for b in got] == [b[0] for b in full]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(got, full))
