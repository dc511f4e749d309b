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
    # the last round wraps around: the fill repeats the first samples of the epoch's order
    assert seen == Counter(range(36)) + Counter(list(plan.ordered_ids(2))[:fill])


def test_drop_last_gives_each_rank_the_floor_and_no_sample_twice():
    streams = rank_streams(UNEVEN, 5, drop_last=True, seed=1)
    assert [len(s) for s in streams] == [7] * 5
    ids = [i for s in streams for i in s]
    assert len(set(ids)) == 35
    with pytest.raises(ValueError, match="36 samples cannot give each of 40 ranks one"):
        EpochPlan(UNEVEN, rank=0, world_size=40, drop_last=True)


def test_ranks_take_blocks_in_turn_from_one_shard_order_without_shuffle():
    assert rank_streams([4, 4, 4], 3, shuffle=False) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert rank_streams([4, 4, 4], 2, shuffle=False, block_size=3) == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_the_samples_of_each_global_batch_do_not_depend_on_the_number_of_ranks(mode):
    """Rank r's k-th block is its slice of global batch k: W ranks together read what one rank reads alone."""
    pairs_per_step, steps = 4, 20  # 80 positions: more than the 36 samples, so the epoch ends (or resamples)

    def global_batches(world):
        per_rank = pairs_per_step // world
        streams = [list(islice(EpochPlan(UNEVEN, rank=r, world_size=world, mode=mode, seed=5, shuffle_buffer=6,
                                         block_size=per_rank).stream(0), steps * per_rank)) for r in range(world)]
        if mode == "exact":
            streams = [list(s) for s in streams]
        return [[i for s in streams for i in s[k * per_rank:(k + 1) * per_rank]] for k in range(len(streams[0]) // per_rank)]

    one = global_batches(1)
    assert len(one) >= 9 and global_batches(2) == one and global_batches(4) == one


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
    assert list(EpochPlan(UNEVEN, rank=1, world_size=2, seed=1).ordered_ids(3)) == list(a.ordered_ids(3))


def test_resampled_stream_is_endless_seeded_and_differs_per_rank():
    def take(rank, n=100, world=2):
        return list(islice(EpochPlan(UNEVEN, rank=rank, world_size=world, mode="resampled", shuffle=False).stream(0), n))

    stream = take(0)
    assert len(stream) == 100 and stream == take(0) and stream != take(1)
    # unshuffled, whole shards are drawn: every run starts at a shard start and covers it
    everything = take(0, 200, world=1)
    shard_sizes = {0: 7, 7: 7, 14: 7, 21: 3, 24: 7, 31: 5}  # by first sample id
    i = 0
    while i + 7 <= len(everything):
        first, size = everything[i], shard_sizes[everything[i]]
        assert everything[i:i + size] == list(range(first, first + size))
        i += size
    assert stream == everything[0::2][:100] and take(1) == everything[1::2][:100]


def test_replacements_follow_the_epoch_order_and_cover_every_other_sample():
    plan = EpochPlan(UNEVEN, seed=4)
    order = list(plan.ordered_ids(0))
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
