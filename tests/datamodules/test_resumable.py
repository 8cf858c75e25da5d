"""The mid-epoch-resumable training loader (datamodules/resumable.py), on its own."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlm.datamodules.episodic import EpisodeSampler
from vlm.datamodules.resumable import ResumableLoader, ResumableSampler, ResumeMismatchError, SeededDataset, resumable_loader


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
    with pytest.raises(ResumeMismatchError, match="data.init_args.loader.batch_size was 3 in the checkpoint and is 4 now.*epoch-end checkpoint"):
        resumable_loader(NoisyItems(12), batch_size=4).load_state_dict(first.state_dict())


def test_a_larger_batch_size_near_the_epoch_end_is_refused_not_skipped() -> None:
    """Issue 24: 2 of 3 batches done at batch size 2 (6 items), resumed at batch size 3. The new
    loader has 2 batches, so the old end-of-epoch shortcut (``batches >= len(self)``, with the *new*
    count) took the state for a finished epoch and the last 2 items were never trained on."""
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(6), batch_size=2)
    batches(first, limit=2)
    state = first.state_dict()
    assert state["batches"] == 2 and state["epoch_batches"] == 3
    again = resumable_loader(NoisyItems(6), batch_size=3)
    with pytest.raises(ResumeMismatchError) as err:
        again.load_state_dict(state)
    message = str(err.value)
    assert "after batch 2 of 3 of epoch 0" in message
    assert "data.init_args.loader.batch_size was 2 in the checkpoint and is 3 now" in message
    assert "--data.init_args.loader.batch_size 2" in message and "epoch-end checkpoint" in message


def _distributed(n: int, batch_size: int, world: int, seed: int = 0) -> ResumableLoader:
    """Rank 0's training loader of ``world`` processes over ``n`` items."""
    ds = SeededDataset(NoisyItems(n))
    return ResumableLoader(ds, batch_size=batch_size, sampler=ResumableSampler(ds, num_replicas=world, rank=0, seed=seed))


#: (what changes, the loader that wrote the state, the loader that resumes, what the error must say).
#: Every setting the saved position depends on: batch size, shots and sampling seed (the datamodule's
#: settings), the multi-process order's seed, the world size, and the training set's size.
CHANGES = {
    "batch size": (lambda: resumable_loader(NoisyItems(12), batch_size=2), lambda: resumable_loader(NoisyItems(12), batch_size=3),
                   ["data.init_args.loader.batch_size was 2 in the checkpoint and is 3 now", "--data.init_args.loader.batch_size 2"]),
    "shots": (lambda: resumable_loader(NoisyItems(12), 2, settings={"data.init_args.num_shots": 2}),
              lambda: resumable_loader(NoisyItems(12), 2, settings={"data.init_args.num_shots": 4}),
              ["data.init_args.num_shots was 2 in the checkpoint and is 4 now", "--data.init_args.num_shots 2"]),
    "sampling seed": (lambda: resumable_loader(NoisyItems(12), 2, settings={"data.init_args.seed": 1}),
                      lambda: resumable_loader(NoisyItems(12), 2, settings={"data.init_args.seed": 2}),
                      ["data.init_args.seed was 1 in the checkpoint and is 2 now", "--data.init_args.seed 1"]),
    "order seed": (lambda: _distributed(24, 2, world=2, seed=0), lambda: _distributed(24, 2, world=2, seed=5),
                   ["seed_everything was 0 in the checkpoint and is 5 now", "--seed_everything 0"]),
    "world size": (lambda: _distributed(24, 2, world=2), lambda: _distributed(24, 2, world=1),
                   ["world size (processes: trainer.devices x trainer.num_nodes) was 2 in the checkpoint and is 1 now",
                    "(trainer.devices x trainer.num_nodes = 2)"]),
    "dataset size": (lambda: resumable_loader(NoisyItems(12), batch_size=2), lambda: resumable_loader(NoisyItems(14), batch_size=2),
                     ["training set size (items) was 12 in the checkpoint and is 14 now", "(the checkpoint's training set of 12 items)"]),
}  # fmt: skip


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_setting_the_position_depends_on_is_checked(change: str) -> None:
    """A mid-epoch state (1 batch done) resumed with one setting changed: a ResumeMismatchError that
    names that setting (and no other), its saved and current values, and the fix."""
    before, after, expected = CHANGES[change]
    torch.manual_seed(0)
    first = before()
    batches(first, limit=1)
    with pytest.raises(ResumeMismatchError) as err:
        after().load_state_dict(first.state_dict())
    message = str(err.value)
    for part in expected:
        assert part in message, message
    assert message.count(" in the checkpoint and is ") == 1, f"only the changed setting is named: {message}"
    assert "Resume with the checkpoint's settings" in message and "epoch-end checkpoint" in message


def test_one_process_ignores_the_order_seed() -> None:
    """One process draws each epoch's seed from the global generator (restored with the checkpoint),
    so another ``seed_everything`` replays the saved epoch exactly: no error."""
    torch.manual_seed(0)
    full = [b[0] for b in batches(resumable_loader(NoisyItems(6), batch_size=2, seed=0))]
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(6), batch_size=2, seed=0)
    head = [b[0] for b in batches(first, limit=1)]
    again = resumable_loader(NoisyItems(6), batch_size=2, seed=7)
    again.load_state_dict(first.state_dict())
    assert head + [b[0] for b in batches(again)] == full


def test_epoch_end_state_accepts_other_settings() -> None:
    """A state saved after its epoch's last batch (by its own count) replays nothing, so a new batch
    size or training set just starts the next epoch (the documented way to change them)."""
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(6), batch_size=2)
    batches(first)
    again = resumable_loader(NoisyItems(8), batch_size=4)
    again.load_state_dict(first.state_dict())
    assert len(batches(again)) == 2


def test_states_written_before_the_checks_still_resume() -> None:
    """A checkpoint from before ``epoch_batches``, ``dataset_size``, ``seed`` and ``settings`` were
    saved: its epoch length comes from its own batch size and sample count, and it resumes."""
    torch.manual_seed(0)
    first = resumable_loader(NoisyItems(6), batch_size=2)
    batches(first, limit=2)
    old = {k: v for k, v in first.state_dict().items() if k not in ("epoch_batches", "dataset_size", "seed", "settings")}
    again = resumable_loader(NoisyItems(6), batch_size=2)
    again.load_state_dict(old)
    assert len(batches(again)) == 1
    with pytest.raises(ResumeMismatchError, match="after batch 2 of 3 .*batch_size was 2 in the checkpoint and is 3 now"):
        resumable_loader(NoisyItems(6), batch_size=3).load_state_dict(old)


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
