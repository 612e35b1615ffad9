"""Samplers: seeded determinism, exact skip-ahead, rank sharding, shard plans, loader resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import franca.distributed
from franca.data import samplers
from franca.data.loaders import SamplerType, make_data_loader
from franca.data.samplers import EpochSampler, InfiniteSampler, ShardStreamSampler, rank_and_world_size


def take(sampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


class IndexDataset(Dataset):
    """Item ``i`` is ``i`` itself, so batches show exactly which indices were drawn."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def test_infinite_same_seed_same_stream_other_seed_other_stream():
    a = take(InfiniteSampler(sample_count=50, shuffle=True, seed=3, start=0, step=1), 200)
    b = take(InfiniteSampler(sample_count=50, shuffle=True, seed=3, start=0, step=1), 200)
    c = take(InfiniteSampler(sample_count=50, shuffle=True, seed=4, start=0, step=1), 200)
    assert a == b
    assert a != c


def test_infinite_each_epoch_is_a_fresh_permutation():
    stream = take(InfiniteSampler(sample_count=37, shuffle=True, seed=0, start=0, step=1), 37 * 4)
    epochs = [stream[i * 37 : (i + 1) * 37] for i in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(37))
    assert len({tuple(e) for e in epochs}) == 4


def test_infinite_without_shuffle_cycles_in_order():
    assert take(InfiniteSampler(sample_count=5, start=0, step=1), 12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert take(InfiniteSampler(sample_count=5, start=1, step=2), 6) == [1, 3, 0, 2, 4, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("advance", [0, 1, 13, 29, 100])
def test_infinite_advance_equals_skipping(world_size, advance):
    for rank in range(world_size):
        full = take(InfiniteSampler(sample_count=29, shuffle=True, seed=5, start=rank, step=world_size), advance + 60)
        resumed = take(
            InfiniteSampler(sample_count=29, shuffle=True, seed=5, start=rank, step=world_size, advance=advance), 60
        )
        assert resumed == full[advance:]


@pytest.mark.parametrize("world_size,count", [(2, 10), (3, 10), (4, 3), (5, 17)])
def test_infinite_ranks_partition_the_single_process_stream(world_size, count):
    per_rank = [
        take(InfiniteSampler(sample_count=count, shuffle=True, seed=1, start=r, step=world_size), 40)
        for r in range(world_size)
    ]
    interleaved = [per_rank[i % world_size][i // world_size] for i in range(40 * world_size)]
    assert interleaved == take(
        InfiniteSampler(sample_count=count, shuffle=True, seed=1, start=0, step=1), 40 * world_size
    )
    # over one epoch the ranks are disjoint and cover everything
    first_epoch = interleaved[:count]
    assert sorted(first_epoch) == list(range(count))


def test_rank_comes_from_franca_distributed(monkeypatch):
    monkeypatch.setattr(franca.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(franca.distributed, "get_world_size", lambda: 3)
    assert rank_and_world_size() == (2, 3)
    got = take(InfiniteSampler(sample_count=9), 3)
    assert got == [2, 5, 8]


def test_invalid_sampler_arguments_raise():
    with pytest.raises(ValueError, match="start < step"):
        InfiniteSampler(sample_count=4, start=3, step=2)
    with pytest.raises(ValueError, match="at least one sample"):
        InfiniteSampler(sample_count=0, start=0, step=1)
    with pytest.raises(ValueError, match="advance"):
        InfiniteSampler(sample_count=4, start=0, step=1, advance=-1)


def test_epoch_sampler_set_epoch_reshuffles_deterministically():
    sampler = EpochSampler(size=20, sample_count=20, shuffle=True, seed=7, start=0, step=1)
    e0 = list(sampler)
    sampler.set_epoch(1)
    e1 = list(sampler)
    again = EpochSampler(size=20, sample_count=20, shuffle=True, seed=7, start=0, step=1)
    again.set_epoch(1)
    assert sorted(e0) == sorted(e1) == list(range(20))
    assert e0 != e1
    assert list(again) == e1
    assert len(sampler) == 20


def test_epoch_sampler_tiles_and_shards_over_ranks():
    world = 3
    parts = []
    for rank in range(world):
        sampler = EpochSampler(size=25, sample_count=10, shuffle=True, seed=0, start=rank, step=world)
        parts.append(list(sampler))
        assert len(sampler) == len(parts[-1])
    merged = sorted(itertools.chain.from_iterable(parts))
    assert len(merged) == 25
    counts = np.bincount(merged, minlength=10)
    assert counts.max() <= 3 and counts.min() >= 2  # 25 draws from 3 tiled copies, each index at most 3 times


def test_epoch_sampler_advance_skips_only_the_first_epoch():
    full = EpochSampler(size=12, sample_count=12, shuffle=True, seed=2, start=0, step=1)
    resumed = EpochSampler(size=12, sample_count=12, shuffle=True, seed=2, start=0, step=1, advance=5)
    assert len(resumed) == 7
    assert list(resumed) == list(full)[5:]
    assert list(resumed) == list(full)


def test_shard_plans_deal_each_shard_once_per_epoch():
    for epoch in range(3):
        plans = [ShardStreamSampler(shard_count=10, consumer=c, consumer_count=4, seed=1).plan(epoch) for c in range(4)]
        dealt = sorted(itertools.chain.from_iterable(p.shards for p in plans))
        assert dealt == list(range(10))
        assert all(p.sample_stride == 1 for p in plans)
    s = ShardStreamSampler(shard_count=10, consumer=0, consumer_count=1, seed=1)
    assert s.plan(0).shards != s.plan(1).shards
    assert ShardStreamSampler(shard_count=10, consumer=0, consumer_count=1, shuffle=False).plan(5).shards == tuple(
        range(10)
    )


def test_shard_plans_with_fewer_shards_than_consumers_stride_samples():
    plans = [ShardStreamSampler(shard_count=2, consumer=c, consumer_count=5).plan(0) for c in range(5)]
    assert all(p.shards == plans[0].shards and sorted(p.shards) == [0, 1] for p in plans)
    assert [(p.sample_offset, p.sample_stride) for p in plans] == [(c, 5) for c in range(5)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_yields_exactly_the_remaining_batches(num_workers):
    dataset, batch = IndexDataset(23), 4
    full = make_data_loader(dataset, batch, num_workers, seed=11, sampler_type=SamplerType.SHARDED_INFINITE)
    reference = [b.tolist() for b in itertools.islice(full, 15)]
    resumed = make_data_loader(
        dataset, batch, num_workers, seed=11, sampler_type=SamplerType.SHARDED_INFINITE, sampler_advance=9 * batch
    )
    assert [b.tolist() for b in itertools.islice(resumed, 6)] == reference[9:]


def test_epoch_loader_len_and_coverage():
    loader = make_data_loader(IndexDataset(10), 4, 0, sampler_type=SamplerType.EPOCH, drop_last=False)
    batches = list(loader)
    assert len(loader) == 3
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert loader.pin_memory == torch.cuda.is_available()


def test_distributed_sampler_without_process_group_visits_everything_once():
    loader = make_data_loader(
        IndexDataset(7), 3, 0, shuffle=False, sampler_type=SamplerType.DISTRIBUTED, drop_last=False
    )
    assert torch.cat(list(loader)).tolist() == list(range(7))


def test_loader_rejects_meaningless_sampler_options():
    with pytest.raises(ValueError, match="infinite"):
        make_data_loader(IndexDataset(4), 2, 0, sampler_type=SamplerType.INFINITE, sampler_size=10)
    with pytest.raises(ValueError, match="streamed datasets"):
        make_data_loader(IndexDataset(4), 2, 0, sampler_type=SamplerType.MULTISHARDSTREAMER)
    with pytest.raises(ValueError, match="batch_size"):
        make_data_loader(IndexDataset(4), 0, 0)


def test_persistent_workers_only_with_workers():
    assert make_data_loader(IndexDataset(4), 2, 0, persistent_workers=True).persistent_workers is False
    assert make_data_loader(IndexDataset(4), 2, 1, persistent_workers=True).persistent_workers is True


def test_samplers_module_has_no_global_rng_dependence():
    torch.manual_seed(0)
    np.random.seed(0)
    a = take(InfiniteSampler(sample_count=20, shuffle=True, seed=9, start=0, step=1), 20)
    torch.manual_seed(123)
    np.random.seed(123)
    b = take(InfiniteSampler(sample_count=20, shuffle=True, seed=9, start=0, step=1), 20)
    assert a == b
    assert samplers.epoch_permutation(20, 9, 0).tolist() == a
