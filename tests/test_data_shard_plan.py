"""The epoch plan alone: no tar is opened, so these say what each rank and worker will read."""

from collections import Counter
from itertools import islice

import pytest

from ear_dist.data.shards import EpochPlan

UNEVEN = [7, 7, 7, 3, 7, 5]  # 36 samples


def rank_streams(counts, world, epoch=0, **settings):
    return [list(EpochPlan(counts, rank=r, world_size=world, **settings).stream(epoch)) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 5, 7, 36, 40])
@pytest.mark.parametrize("shuffle", [True, False])
def test_exact_epoch_reads_every_sample_once_except_the_wrap_around_fill(world, shuffle):
    plan = EpochPlan(UNEVEN, world_size=world, shuffle=shuffle, shuffle_buffer=4, seed=3)
    streams = rank_streams(UNEVEN, world, epoch=2, shuffle=shuffle, shuffle_buffer=4, seed=3)
    quota = -(-36 // world)
    assert [len(s) for s in streams] == [quota] * world == [plan.samples_per_rank()] * world
    fill = quota * world - 36  # fewer than 36 here, so the fill wraps once
    seen = Counter(i for s in streams for i in s)
    # the last slices wrap around: the fill repeats the first samples of the epoch's order
    assert seen == Counter(range(36)) + Counter(plan.global_order(2)[:fill].tolist())


def test_drop_last_gives_each_rank_the_floor_and_no_sample_twice():
    streams = rank_streams(UNEVEN, 5, drop_last=True, seed=1)
    assert [len(s) for s in streams] == [7] * 5
    ids = [i for s in streams for i in s]
    assert len(set(ids)) == 35
    with pytest.raises(ValueError, match="36 samples cannot give each of 40 ranks one"):
        EpochPlan(UNEVEN, rank=0, world_size=40, drop_last=True)


def test_ranks_read_contiguous_slices_of_one_shard_order_without_shuffle():
    streams = rank_streams([4, 4, 4], 3, shuffle=False)
    assert streams == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("block_size", [1, 3])
def test_workers_dealt_blocks_in_turn_give_back_the_rank_stream(start, block_size):
    plan = EpochPlan(UNEVEN, rank=1, world_size=2, seed=9, shuffle_buffer=6, block_size=block_size)
    stream = list(plan.stream(1))
    for num_workers in (1, 2, 3, 4):
        per_worker = [list(plan.worker_stream(1, start, w, num_workers)) for w in range(num_workers)]
        # what a DataLoader does with batch_size == block_size: one block from each worker in turn
        merged, w = [], 0
        while any(per_worker):
            merged += per_worker[w][:block_size]
            per_worker[w] = per_worker[w][block_size:]
            w = (w + 1) % num_workers
        assert merged == stream[start:]


def test_plan_is_seeded_per_epoch_and_shared_by_ranks():
    a = EpochPlan(UNEVEN, seed=1)
    assert list(a.stream(0)) == list(EpochPlan(UNEVEN, seed=1).stream(0))
    assert list(a.stream(0)) != list(a.stream(1)) and list(a.stream(0)) != list(EpochPlan(UNEVEN, seed=2).stream(0))
    assert (EpochPlan(UNEVEN, rank=1, world_size=2, seed=1).global_order(3) == a.global_order(3)).all()


def test_resampled_stream_is_endless_seeded_and_differs_per_rank():
    def take(rank, n=100):
        return list(islice(EpochPlan(UNEVEN, rank=rank, world_size=2, mode="resampled", shuffle=False).stream(0), n))

    stream = take(0)
    assert len(stream) == 100 and stream == take(0) and stream != take(1)
    # unshuffled, whole shards are drawn: every run starts at a shard start and covers it
    shard_sizes = {0: 7, 7: 7, 14: 7, 21: 3, 24: 7, 31: 5}  # by first sample id
    i = 0
    while i + 7 <= len(stream):
        first, size = stream[i], shard_sizes[stream[i]]
        assert stream[i:i + size] == list(range(first, first + size))
        i += size


def test_replacements_follow_the_epoch_order_and_cover_every_other_sample():
    plan = EpochPlan(UNEVEN, seed=4)
    order = plan.global_order(0).tolist()
    got = list(plan.replacements(0, order[30]))
    assert got == order[31:] + order[:30]


def test_shard_of_maps_sample_ids_to_shard_and_row():
    plan = EpochPlan([3, 0, 2])
    assert [plan.shard_of(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]


@pytest.mark.parametrize("settings, message", [
    ({"mode": "x"}, "mode must be exact or resampled"),
    ({"rank": 2, "world_size": 2}, r"rank 2 is not in \[0, world_size=2\)"),
    ({"block_size": 0}, "block_size must be >= 1"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        EpochPlan(UNEVEN, **settings)


def test_an_empty_directory_has_no_plan():
    with pytest.raises(ValueError, match="no samples"):
        EpochPlan([0, 0])
