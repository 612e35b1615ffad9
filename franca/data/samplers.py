"""Seeded, rank-aware index samplers and the shard plan of streamed datasets.

Every ordering depends only on ``(seed, epoch)``, never on global RNG state, so all ranks agree on it
and a resumed run can jump straight to the position it stopped at.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler


def rank_and_world_size() -> tuple[int, int]:
    """This process's ``(rank, world_size)``: from ``franca.distributed`` when it provides them, else from an
    initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    try:
        distributed = importlib.import_module("franca.distributed")
    except ImportError:
        distributed = None
    if hasattr(distributed, "get_rank") and hasattr(distributed, "get_world_size"):
        return int(distributed.get_rank()), int(distributed.get_world_size())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _resolve_shard(start: int | None, step: int | None) -> tuple[int, int]:
    rank, world_size = rank_and_world_size()
    start = rank if start is None else start
    step = world_size if step is None else step
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"sampler shard {start} of {step} is invalid: need 0 <= start < step")
    return start, step


def epoch_permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``range(count)`` in epoch ``epoch``: a permutation drawn from PCG64 seeded with ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class _ShardedIndexSampler(Sampler[int]):
    """Settings shared by the index samplers: ``sample_count`` indices, shuffled per ``(seed, epoch)`` when
    ``shuffle``, this rank's share ``start :: step`` (default: rank and world size) and ``advance``
    indices of it to skip. ``epoch_size`` is only validated here (the epoch sampler keeps it)."""

    def __init__(
        self,
        *,
        sample_count: int,
        shuffle: bool,
        seed: int,
        start: int | None,
        step: int | None,
        advance: int,
        epoch_size: int | None = None,
    ) -> None:
        if sample_count < 1:
            raise ValueError(f"a sampler needs at least one sample, got sample_count={sample_count}")
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"epoch size must be >= 1, got {epoch_size}")
        if advance < 0:
            raise ValueError(f"sampler advance must be >= 0, got {advance}")
        self._sample_count = sample_count
        self._shuffle = shuffle
        self._seed = seed
        self._start, self._step = _resolve_shard(start, step)
        self._advance = advance


class InfiniteSampler(_ShardedIndexSampler):
    """Endless stream of indices shared out across ranks.

    The global stream is the concatenation over epochs ``e = 0, 1, …`` of ``range(sample_count)`` —
    shuffled by :func:`epoch_permutation` ``(seed, e)`` when ``shuffle``. Rank ``r`` of ``W`` takes the
    global positions ``r, r + W, r + 2W, …``, so any ``W`` consecutive positions go to ``W`` different
    ranks and each epoch is covered exactly once with no sample dropped. ``advance`` skips the first
    ``advance`` indices of this rank's stream in O(1) epochs: resuming after ``k`` samples per rank with
    ``advance=k`` yields exactly what the uninterrupted sampler yields from its ``k``-th index on.
    """

    def __init__(
        self,
        *,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        start: int | None = None,
        step: int | None = None,
        advance: int = 0,
    ) -> None:
        super().__init__(sample_count=sample_count, shuffle=shuffle, seed=seed, start=start, step=step, advance=advance)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._shuffle:
            return epoch_permutation(self._sample_count, self._seed, epoch)
        return np.arange(self._sample_count)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self._start + self._advance * self._step, self._sample_count)
        while True:
            yield from self._epoch_order(epoch)[offset :: self._step].tolist()
            taken = -(-(self._sample_count - offset) // self._step)
            offset = offset + taken * self._step - self._sample_count
            epoch += 1
            # With step > sample_count an epoch can be skipped entirely.
            epoch, offset = epoch + offset // self._sample_count, offset % self._sample_count


ShardedInfiniteSampler = InfiniteSampler
"""DINOv2's name for the same sampler."""


class EpochSampler(_ShardedIndexSampler):
    """``size`` indices per epoch (``range(sample_count)`` tiled as needed), shuffled per ``(seed, epoch)``.

    Rank ``r`` of ``W`` takes positions ``r, r + W, …`` of the epoch, so ranks are disjoint and cover
    the epoch together (their lengths differ by at most one). Call :meth:`set_epoch` before each epoch.
    ``advance`` skips that many of this rank's indices in the first epoch iterated (mid-epoch resume).
    """

    def __init__(
        self,
        *,
        size: int,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        start: int | None = None,
        step: int | None = None,
        advance: int = 0,
    ) -> None:
        super().__init__(
            sample_count=sample_count,
            shuffle=shuffle,
            seed=seed,
            start=start,
            step=step,
            advance=advance,
            epoch_size=size,
        )
        self._size = size
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _full_length(self) -> int:
        return len(range(self._start, self._size, self._step))

    def __iter__(self) -> Iterator[int]:
        repeats = -(-self._size // self._sample_count)
        indices = np.tile(np.arange(self._sample_count), repeats)
        if self._shuffle:
            indices = indices[epoch_permutation(len(indices), self._seed, self._epoch)]
        mine = indices[: self._size][self._start :: self._step]
        skip, self._advance = self._advance, 0
        yield from mine[skip:].tolist()

    def __len__(self) -> int:
        return max(0, self._full_length() - self._advance)


@dataclass(frozen=True)
class ShardPlan:
    """What one stream consumer reads in one epoch: ``shards`` in order, keeping every ``sample_stride``-th
    sample starting at ``sample_offset`` (stride 1 when there are at least as many shards as consumers)."""

    shards: tuple[int, ...]
    sample_offset: int
    sample_stride: int


class ShardStreamSampler:
    """Deal tar shards to stream consumers (``rank × DataLoader worker``), epoch after epoch.

    Epoch ``e`` orders the shards by :func:`epoch_permutation` ``(seed, e)`` (identity without shuffle);
    consumer ``c`` of ``C`` reads shards ``c, c + C, …`` of that order. With fewer shards than consumers,
    each consumer reads every shard and keeps samples ``c, c + C, …`` of the epoch's stream instead.
    Either way the consumers are disjoint and together cover each epoch exactly once.
    """

    def __init__(self, *, shard_count: int, consumer: int, consumer_count: int, shuffle: bool = True, seed: int = 0):
        if shard_count < 1:
            raise ValueError("a shard stream needs at least one shard")
        if not 0 <= consumer < consumer_count:
            raise ValueError(f"stream consumer {consumer} of {consumer_count} is invalid")
        self._shard_count = shard_count
        self._consumer = consumer
        self._consumer_count = consumer_count
        self._shuffle = shuffle
        self._seed = seed

    def plan(self, epoch: int) -> ShardPlan:
        order = (
            epoch_permutation(self._shard_count, self._seed, epoch) if self._shuffle else np.arange(self._shard_count)
        )
        if self._shard_count >= self._consumer_count:
            return ShardPlan(tuple(order[self._consumer :: self._consumer_count].tolist()), 0, 1)
        return ShardPlan(tuple(order.tolist()), self._consumer, self._consumer_count)

    def plans(self, infinite: bool = True) -> Iterator[ShardPlan]:
        epochs = itertools.count() if infinite else range(1)
        return (self.plan(epoch) for epoch in epochs)
