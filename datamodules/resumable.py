"""A training loader that Lightning can resume mid-epoch, bitwise.

Lightning saves ``loader.state_dict()`` in every checkpoint and, when a run restarts inside an
epoch, calls ``loader.load_state_dict()`` before iterating (``_Stateful`` loaders). Three pieces make
the resumed epoch identical to the uninterrupted one:

* :class:`ResumableSampler` draws each epoch's order from one recorded ``epoch_seed`` and can start
  at any sample. One process: the seed is one int64 draw from the global torch generator at the
  start of the epoch, exactly as ``RandomSampler`` does, so orders (and results) equal a plain
  ``shuffle=True`` loader's. Several processes: ``seed + epoch`` as ``DistributedSampler`` does
  (it *is* a ``DistributedSampler``, so Lightning does not replace it), then the rank's share.
* Every index comes with its own seed (:class:`SeededIndex`), and :class:`SeededDataset` runs the
  transform under the torch, ``random`` and numpy generators seeded with it (then restores them).
  A sample's augmentation is a function of (epoch seed, index): the same after a resume, for any
  ``num_workers``, and the global generators that the model uses are never touched by the data.
* :class:`ResumableLoader` counts the batches it handed out this epoch. Lightning's fetcher does not
  prefetch from sized loaders, so at a checkpoint this count is the number of batches trained on.
  On resume it skips them at the sampler (no image is loaded for them) and builds its iterator
  without consuming global random draws, so the restored generator states stay where they were.

:class:`PassLoader` (the evaluation loaders, and the base of :class:`ResumableLoader`) makes the
global generator's stream independent of ``num_workers`` and of persistent workers.

What a mid-epoch state depends on is saved with it and checked *before* anything else on resume:
the batch size, the process count (world size), the training set's size, the order's seed where
the order uses it, and the datamodule's own settings that choose the training set (``settings``:
e.g. ``data.init_args.num_shots`` and ``data.init_args.seed``). A change of any of them would make
"skip the batches already trained on" skip or repeat other samples, so it is a
:class:`ResumeMismatchError` naming each setting, its saved and current value, and the fix. A state
saved at the end of its epoch (by its own batch count) replays nothing and accepts any change.

Not resumable mid-epoch (they restart the epoch, with Lightning's warning): iterable datasets
(webdataset shards).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlm.datamodules.distributed import rank_and_world


class ResumeMismatchError(ValueError):
    """A mid-epoch loader state that the current settings cannot replay (batch size, world size,
    training set or its seed changed since the checkpoint was written)."""


class SeededIndex(NamedTuple):
    """A dataset index and the seed of that sample's random transforms."""

    index: int
    seed: int


def sample_seed(epoch_seed: int, *where: int) -> int:
    """A 63-bit seed for the sample at ``where`` (its index, or episode and slot) in the epoch drawn
    with ``epoch_seed`` (SeedSequence mix: neighbouring samples and epochs get unrelated streams)."""
    state = np.random.SeedSequence((int(epoch_seed) % 2**64, *map(int, where))).generate_state(1, np.uint64)
    return int(state[0]) >> 1


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the body with torch (CPU), ``random`` and numpy global generators seeded by ``seed``;
    their previous states are restored afterwards."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


class SeededDataset(Dataset):
    """``dataset[i]`` for an int; under :func:`seeded_rngs` for a :class:`SeededIndex`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | SeededIndex) -> Any:
        if isinstance(key, SeededIndex):
            with seeded_rngs(key.seed):
                return self.dataset[key.index]
        return self.dataset[key]


class ResumableSampler(DistributedSampler):
    """Shuffled indices with per-sample seeds, from a recorded epoch seed (module docstring).

    Args:
        dataset: the (sized) training set.
        num_replicas, rank: the process group's size and this rank (default: the initialised group,
            else one process).
        seed: base seed of the multi-process order (``seed + epoch``); one process draws its own.
    """

    #: The setting that ``seed`` comes from (named in a :class:`ResumeMismatchError`).
    seed_setting = "seed_everything"

    def __init__(self, dataset: Dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None, seed: int = 0) -> None:
        if num_replicas is None or rank is None:
            rank, num_replicas = rank_and_world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch_seed: Optional[int] = None
        self._resume: Optional[tuple[int, int]] = None

    def resume(self, epoch_seed: int, skip: int) -> None:
        """Make the next pass replay the epoch drawn with ``epoch_seed``, from its ``skip``-th sample."""
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"cannot skip {skip} samples of an epoch of {self.num_samples}.")
        self._resume = (int(epoch_seed), int(skip))

    @property
    def seeds_order(self) -> bool:
        """Whether ``seed`` decides the order: several processes (``seed + epoch``). One process draws
        its epoch seed from the global generator, which a resume restores from the checkpoint."""
        return self.num_replicas > 1

    def _draw_seed(self) -> int:
        if self.num_replicas == 1:
            return int(torch.empty((), dtype=torch.int64).random_().item())  # as RandomSampler
        return self.seed + self.epoch  # as DistributedSampler

    def __iter__(self) -> Iterator[SeededIndex]:  # type: ignore[override]
        resume, self._resume = self._resume, None
        seed, skip = resume if resume is not None else (self._draw_seed(), 0)
        self.epoch_seed = seed
        g = torch.Generator()
        g.manual_seed(seed)
        order = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        if self.num_replicas > 1:
            pad = self.total_size - len(order)
            order = (order + (order * math.ceil(pad / len(order)))[:pad])[self.rank : self.total_size : self.num_replicas]
        for index in order[skip:]:
            yield SeededIndex(index, sample_seed(seed, index))


class PassLoader(DataLoader):
    """A ``DataLoader`` that consumes one global torch draw per pass whatever ``num_workers`` is.

    A new iterator draws its workers' base seed from the global generator; persistent workers reuse
    theirs and draw nothing, so with ``num_workers > 0`` every validation pass would shift the
    generator that training then uses, differently from ``num_workers=0`` and differently again
    after a resume (whose first pass builds a new iterator). Drawing the same int64 on reuse keeps
    the global stream, and so the run, independent of the worker setting.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return super().__iter__()


class ResumableOrder(Protocol):
    """What :class:`ResumableLoader` needs from its sampler or batch sampler: the pass's ``epoch``
    and ``epoch_seed``, its length in units (``num_samples``: samples, or batches for a batch
    sampler), and ``resume(epoch_seed, skip)`` to replay a pass from unit ``skip``."""

    epoch: int
    epoch_seed: Optional[int]
    num_samples: int
    num_replicas: int

    def set_epoch(self, epoch: int) -> None: ...

    def resume(self, epoch_seed: int, skip: int) -> None: ...


class ResumableLoader(PassLoader):
    """A ``DataLoader`` with Lightning's ``state_dict`` / ``load_state_dict`` (module docstring). Its
    order comes from a :class:`ResumableSampler` (build with :func:`resumable_loader`) or from a batch
    sampler with the :class:`ResumableOrder` methods (episodes: ``vlm.datamodules.episodic``).

    Args:
        settings: the datamodule's settings that choose the training set, by the name a user sets
            them with (``{"data.init_args.num_shots": 16, "data.init_args.seed": 1}``); plain values.
            Saved in the state and compared on a mid-epoch resume, so a change is named, not replayed.
        args, kwargs: ``DataLoader``'s.
    """

    def __init__(self, *args: Any, settings: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        order = self.sampler if isinstance(self.sampler, ResumableSampler) else self.batch_sampler
        if not callable(getattr(order, "resume", None)):
            raise TypeError("ResumableLoader needs a ResumableSampler or a resumable batch sampler; see resumable_loader().")
        self.order: ResumableOrder = order  # type: ignore[assignment]
        self.settings: dict[str, Any] = dict(settings or {})
        self._batches = 0
        self._pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch stands (its seed, the batches handed out so far and the epoch's
        length in batches) and every setting that replaying it depends on."""
        return {
            "epoch": int(self.order.epoch),
            "epoch_seed": self.order.epoch_seed,
            "batches": self._batches,
            "epoch_batches": len(self),
            "batch_size": self.batch_size,
            "num_replicas": self.order.num_replicas,
            "num_samples": self.order.num_samples,
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "seed": getattr(self.order, "seed", None),
            "settings": dict(self.settings),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the saved epoch from its next batch on the next ``iter()``.

        A state saved before the epoch's first batch, or after its last one (counted with the
        *saved* batch size and sizes), replays nothing: Lightning starts a fresh epoch. Any other
        state is checked against the current settings first and refused with a
        :class:`ResumeMismatchError` if one changed (the batches to skip would be other samples).
        """
        if state.get("epoch_seed") is None or not state.get("batches"):
            return  # saved before the epoch's first batch: nothing to replay
        if int(state["batches"]) >= _saved_epoch_batches(state, self.drop_last):
            return  # saved after the epoch's last batch: Lightning starts the next epoch
        changes = self._changes(state)
        if changes:
            raise ResumeMismatchError(_mismatch_message(state, changes))
        self._pending = dict(state)

    def _changes(self, state: Mapping[str, Any]) -> list[tuple[str, Any, Any, str]]:
        """(setting, saved value, current value, how to resume) for each setting the saved epoch
        position depends on that differs now. The per-process sample count and the sampler's seed
        are named only when nothing else explains their change (they follow from the others)."""
        changes: list[tuple[str, Any, Any, str]] = []
        saved_settings = state.get("settings")
        if saved_settings is not None:  # checkpoints written before settings were saved have none
            for name in sorted(set(saved_settings) | set(self.settings)):
                old, new = saved_settings.get(name), self.settings.get(name)
                if old != new:
                    changes.append((name, old, new, f"--{name} {old}"))
        if state.get("batch_size") != self.batch_size:
            old = state.get("batch_size")
            changes.append(("data.init_args.loader.batch_size", old, self.batch_size, f"--data.init_args.loader.batch_size {old}"))
        if state.get("num_replicas") != self.order.num_replicas:
            old = state.get("num_replicas")
            changes.append(("world size (processes: trainer.devices x trainer.num_nodes)", old, self.order.num_replicas,
                            f"trainer.devices x trainer.num_nodes = {old}"))
        size = len(self.dataset)  # type: ignore[arg-type]
        if "dataset_size" in state and state["dataset_size"] != size:
            changes.append(("training set size (items)", state["dataset_size"], size,
                            f"the checkpoint's training set of {state['dataset_size']} items"))
        if not changes and state.get("num_samples") != self.order.num_samples:
            old = state.get("num_samples")
            changes.append(("samples per process and epoch", old, self.order.num_samples,
                            f"the checkpoint's training set and process count ({old} samples per process)"))
        if not changes and getattr(self.order, "seeds_order", True) and state.get("seed") is not None:
            seed = getattr(self.order, "seed", None)
            if state["seed"] != seed:
                name = getattr(self.order, "seed_setting", "the sampler's seed")
                changes.append((name, state["seed"], seed, f"--{name} {state['seed']}"))
        return changes

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        pending, self._pending = self._pending, None
        start = 0
        if pending is not None:
            start = int(pending["batches"])
            self.order.set_epoch(int(pending["epoch"]))
            self.order.resume(int(pending["epoch_seed"]), start * int(self.batch_size or 1))
            with torch.random.fork_rng(devices=[]):  # the worker base seed draw must not move the restored state
                it = super().__iter__()
        else:
            it = super().__iter__()
        self._batches = start
        return self._count(it)

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._batches += 1
            yield batch


def _saved_epoch_batches(state: Mapping[str, Any], drop_last: bool) -> int:
    """The saved epoch's length in batches: recorded since ``epoch_batches`` was saved, else from the
    saved per-process sample count and batch size (a batch sampler counts batches itself)."""
    if state.get("epoch_batches") is not None:
        return int(state["epoch_batches"])
    samples, batch_size = int(state.get("num_samples") or 0), state.get("batch_size")
    if not batch_size:
        return samples
    return samples // int(batch_size) if drop_last else math.ceil(samples / int(batch_size))


def _mismatch_message(state: Mapping[str, Any], changes: list[tuple[str, Any, Any, str]]) -> str:
    """The :class:`ResumeMismatchError` text: where the checkpoint stopped, each change, each fix."""
    what = "; ".join(f"{name} was {old!r} in the checkpoint and is {new!r} now" for name, old, new, _ in changes)
    fix = ", ".join(f for *_, f in changes)
    return (
        f"Cannot resume the training loader mid-epoch: the checkpoint was written after batch {state['batches']} of "
        f"{_saved_epoch_batches(state, False)} of epoch "
        f"{state.get('epoch')}, and {what}. Skipping the batches already trained on would skip or repeat other "
        f"samples. Resume with the checkpoint's settings ({fix}), or from an epoch-end checkpoint, or start a new run."
    )


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: Optional[int] = None, settings: Optional[Mapping[str, Any]] = None, **kwargs: Any
) -> ResumableLoader:
    """A shuffled, mid-epoch-resumable training loader over ``dataset`` (``kwargs``: DataLoader's,
    except ``shuffle`` / ``sampler``). ``seed`` only sets the multi-process order; by default it is
    ``seed_everything``'s seed, as Lightning's own ``DistributedSampler``. ``settings``: the
    datamodule's settings that choose ``dataset`` (see :class:`ResumableLoader`)."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    for key in ("shuffle", "sampler", "batch_sampler"):
        if key in kwargs:
            raise TypeError(f"resumable_loader chooses the order itself; drop {key!r}.")
    wrapped = SeededDataset(dataset)
    return ResumableLoader(wrapped, batch_size=batch_size, sampler=ResumableSampler(wrapped, seed=seed), settings=settings, **kwargs)
