"""Shards: what `ear-dist data build` writes is read back by every rank and worker exactly once."""

import json
import os
from collections import Counter

import numpy as np
import pytest

from ear_dist.data.pairs import PromptPair
from ear_dist.data.shards import (
    ShardDataset, ShardError, ShardLoader, ShardWriter, buffer_shuffle, read_index, write_shards,
)


def make_pairs(n, tokens=False):
    pairs = []
    for i in range(n):
        pair = PromptPair(f"a church number {i}", f"a barn number {i}", "church" if i % 3 else "nudity", "barn", seed=i)
        if tokens:
            pair.surrogate_tokens = list(range(i, i + 16))
        pairs.append(pair)
    return pairs


def ids(pairs):
    return [p.id for p in pairs]


def test_writer_bounds_shards_by_count_and_writes_index(tmp_path):
    pairs = make_pairs(25, tokens=True)
    index = write_shards(pairs, tmp_path, max_samples_per_shard=10, config={"a": 1})
    assert [s["samples"] for s in index["shards"]] == [10, 10, 5]
    assert sorted(os.listdir(tmp_path)) == ["index.json"] + [f"pairs-00000{i}.tar{ext}" for i in range(3) for ext in ("", ".idx.npy")]
    assert read_index(tmp_path) == index
    assert index["total_samples"] == 25
    assert index["concept_counts"] == {"church": 16, "nudity": 9}
    assert len(index["config_hash"]) == 16 and index["config"] == {"a": 1}


def test_writer_bounds_shards_by_size(tmp_path):
    pairs = make_pairs(40)
    for pair in pairs:
        pair.surrogate_tokens = list(range(576))  # about 2.9 KiB per sample in the tar
    index = write_shards(pairs, tmp_path, max_samples_per_shard=1000, max_shard_bytes=20480)
    assert len(index["shards"]) > 5
    assert sum(s["samples"] for s in index["shards"]) == 40
    for shard in index["shards"]:
        assert shard["bytes"] == (tmp_path / shard["name"]).stat().st_size <= 20480


def test_shards_are_plain_webdataset_and_round_trip(tmp_path):
    import webdataset as wds

    pairs = make_pairs(7, tokens=True)
    pairs[0].target_tokens = [5, 6, 7]
    write_shards(pairs, tmp_path, max_samples_per_shard=4)
    samples = list(wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    assert json.loads(samples[1]["json"])["target"] == "a church number 1"
    back = list(ShardDataset(tmp_path, shuffle=False))
    assert ids(back) == ids(pairs)
    assert back[3].surrogate_tokens.tolist() == list(range(3, 19))
    assert back[0].target_tokens.tolist() == [5, 6, 7] and back[1].target_tokens is None
    assert back[2].to_dict() == pairs[2].to_dict()


def test_failed_build_leaves_no_finished_looking_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_samples_per_shard=3) as writer:
            for i, pair in enumerate(make_pairs(5)):
                if i == 4:
                    raise RuntimeError("boom")
                writer.write(pair)
    # shard 0 completed and was renamed (with its offsets table); shard 1 was in progress and is gone; no index
    assert sorted(os.listdir(tmp_path)) == ["pairs-000000.tar", "pairs-000000.tar.idx.npy"]


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(tmp_path):
    pairs = make_pairs(36)
    write_shards(pairs, tmp_path, max_samples_per_shard=7)  # uneven: 7,7,7,7,7,1
    for epoch in (0, 1):
        seen = []
        per_rank = []
        for rank in (0, 1):
            ds = ShardDataset(tmp_path, rank=rank, world_size=2, shuffle=True, shuffle_buffer=5, seed=3, block_size=3)
            ds.set_epoch(epoch)
            got = [p.id for batch in ShardLoader(ds, num_workers=2) for p in batch]
            per_rank.append(len(got))
            seen += got
        assert per_rank == [18, 18]
        assert Counter(seen) == Counter(ids(pairs))


def test_worker_count_does_not_change_the_stream(tmp_path):
    write_shards(make_pairs(30), tmp_path, max_samples_per_shard=4)
    streams = []
    for workers in (0, 1, 2):
        ds = ShardDataset(tmp_path, rank=1, world_size=2, seed=9, shuffle_buffer=8, block_size=2)
        streams.append([p.id for batch in ShardLoader(ds, num_workers=workers) for p in batch])
    assert streams[0] == streams[1] == streams[2]


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    write_shards(make_pairs(50), tmp_path, max_samples_per_shard=10)
    def order(seed, epoch):
        ds = ShardDataset(tmp_path, seed=seed, shuffle_buffer=16)
        ds.set_epoch(epoch)
        return ids(ds)
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(2, 0) and order(1, 0) != order(1, 1)
    assert sorted(order(1, 0)) == sorted(order(2, 1))


def test_exact_epoch_gives_equal_counts_with_uneven_shards(tmp_path):
    pairs = make_pairs(23)
    write_shards(pairs, tmp_path, max_samples_per_shard=10)  # 10, 10, 3
    for world in (2, 3, 4, 5):
        counts, seen = [], []
        for rank in range(world):
            got = ids(ShardDataset(tmp_path, rank=rank, world_size=world, seed=0))
            counts.append(len(got))
            seen += got
        assert len(set(counts)) == 1 and counts[0] == -(-23 // world)
        assert set(seen) == set(ids(pairs))  # padding repeats some samples, loses none
        assert len(seen) - 23 == counts[0] * world - 23
        dropped = [len(ShardDataset(tmp_path, rank=r, world_size=world, drop_last=True)) for r in range(world)]
        assert dropped == [23 // world] * world


def test_resume_after_k_samples_continues_with_sample_k_plus_1(tmp_path):
    write_shards(make_pairs(30), tmp_path, max_samples_per_shard=8)
    make = lambda: ShardDataset(tmp_path, rank=0, world_size=2, seed=5, shuffle_buffer=6, block_size=2)
    full = [p.id for batch in ShardLoader(make(), num_workers=2) for p in batch]
    assert len(full) == 16  # 8 rounds of 2 blocks of 2: the last round wraps 2 samples around

    loader = ShardLoader(make(), num_workers=2)
    first = []
    for batch in loader:
        first += [p.id for p in batch]
        if len(first) >= 6:
            break
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": 6}

    resumed = ShardLoader(make(), num_workers=2)
    resumed.load_state_dict(state)
    rest = [p.id for batch in resumed for p in batch]
    assert first + rest == full
    assert resumed.state_dict() == {"epoch": 1, "consumed": 0}


def test_resume_with_an_odd_position(tmp_path):
    write_shards(make_pairs(12), tmp_path, max_samples_per_shard=5)
    full = ids(ShardDataset(tmp_path, seed=2))
    ds = ShardDataset(tmp_path, seed=2, block_size=4)
    ds.load_state_dict({"epoch": 0, "consumed": 5})
    assert [p.id for batch in ShardLoader(ds, num_workers=2) for p in batch] == full[5:]


def test_resampled_mode_is_endless_seeded_and_resumable(tmp_path):
    write_shards(make_pairs(10), tmp_path, max_samples_per_shard=3)
    def take(ds, n):
        out = []
        for pair in ds:
            out.append(pair.id)
            if len(out) == n:
                return out
    ds = ShardDataset(tmp_path, mode="resampled", seed=4, shuffle_buffer=4)
    stream = take(ds, 40)
    assert len(stream) == 40  # more than the 10 samples: an endless epoch
    assert take(ShardDataset(tmp_path, mode="resampled", seed=4, shuffle_buffer=4), 40) == stream
    other_rank = take(ShardDataset(tmp_path, mode="resampled", rank=1, world_size=2, seed=4, shuffle_buffer=4), 40)
    assert other_rank != take(ShardDataset(tmp_path, mode="resampled", rank=0, world_size=2, seed=4, shuffle_buffer=4), 40)
    resumed = ShardDataset(tmp_path, mode="resampled", seed=4, shuffle_buffer=4)
    resumed.load_state_dict({"epoch": 0, "consumed": 17})
    assert take(resumed, 23) == stream[17:]


def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def test_truncated_shard_fails_naming_it(tmp_path):
    write_shards(make_pairs(12), tmp_path, max_samples_per_shard=4)
    _truncate(tmp_path / "pairs-000001.tar")
    with pytest.raises(ShardError, match=r"pairs-000001\.tar"):
        list(ShardDataset(tmp_path, shuffle=False))


@pytest.mark.parametrize("with_offsets_table", [True, False])
def test_truncated_member_is_caught_even_without_sizes_in_the_index(tmp_path, with_offsets_table):
    pairs = make_pairs(8)
    for pair in pairs:
        pair.surrogate_tokens = list(range(2000))
    write_shards(pairs, tmp_path, max_samples_per_shard=4)
    index = json.loads((tmp_path / "index.json").read_text())
    for shard in index["shards"]:
        del shard["bytes"]
        if not with_offsets_table:
            del shard["offsets"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    _truncate(tmp_path / "pairs-000000.tar", 0.6)
    with pytest.raises(ShardError, match=r"pairs-000000\.tar: .*(truncated|corrupt)"):
        list(ShardDataset(tmp_path, shuffle=False))


def test_shards_without_offsets_tables_still_read(tmp_path):
    pairs = make_pairs(9, tokens=True)
    write_shards(pairs, tmp_path, max_samples_per_shard=4)
    for table in tmp_path.glob("*.idx.npy"):
        table.unlink()
    back = list(ShardDataset(tmp_path, shuffle=False))
    assert ids(back) == ids(pairs) and back[8].surrogate_tokens.tolist() == list(range(8, 24))


def test_offsets_table_disagreeing_with_the_tar_is_caught(tmp_path):
    write_shards(make_pairs(8), tmp_path, max_samples_per_shard=4)
    table = np.load(tmp_path / "pairs-000001.tar.idx.npy")
    table[2, 0] += 512  # points into the wrong place
    np.save(tmp_path / "pairs-000001.tar.idx.npy", table)
    with pytest.raises(ShardError, match=r"pairs-000001\.tar: corrupt tar header"):
        list(ShardDataset(tmp_path, shuffle=False))


def test_corrupt_shard_fails_naming_it(tmp_path):
    write_shards(make_pairs(12), tmp_path, max_samples_per_shard=4)
    shard = tmp_path / "pairs-000002.tar"
    data = bytearray(shard.read_bytes())
    data[0:200] = b"\x07" * 200  # first header destroyed
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"pairs-000002\.tar"):
        list(ShardDataset(tmp_path, shuffle=False))


def test_bad_shard_is_skipped_and_counts_stay_equal(tmp_path, caplog):
    pairs = make_pairs(16)
    write_shards(pairs, tmp_path, max_samples_per_shard=4)
    _truncate(tmp_path / "pairs-000001.tar", 0.3)
    bad_ids = set(ids(pairs[4:8]))
    counts = []
    for rank in (0, 1):
        ds = ShardDataset(tmp_path, rank=rank, world_size=2, shuffle=False, on_corrupt="skip")
        with caplog.at_level("WARNING"):
            got = ids(ds)
        counts.append(len(got))
        assert not bad_ids & set(got)
    assert counts == [8, 8]
    assert "pairs-000001.tar" in caplog.text


def test_index_problems_are_named(tmp_path):
    with pytest.raises(ShardError, match="no index"):
        ShardDataset(tmp_path)
    (tmp_path / "index.json").write_text('{"version": 1, "shards": []}')
    with pytest.raises(ShardError, match="field 'total_samples' is missing"):
        ShardDataset(tmp_path)


def test_buffer_shuffle_is_a_permutation_with_bounded_displacement():
    import random

    out = list(buffer_shuffle(range(1000), 10, random.Random(0)))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # an item leaves the buffer no earlier than it entered: bounded look-ahead
    assert all(item <= position + 10 for position, item in enumerate(out))


def test_loader_from_config_uses_the_data_section(tmp_path, monkeypatch):
    from ear_dist.config import load_config
    from ear_dist.data.shards import shard_loader_from_config

    write_shards(make_pairs(10), tmp_path, max_samples_per_shard=4)
    cfg = load_config(overrides=[f"data.pairs={tmp_path}", "data.shuffle=false", "data.shards.drop_last=true"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    # an earlier in-process one-rank DeepSpeed run may have left its process group behind
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)
    loader = shard_loader_from_config(cfg, block_size=2)
    assert (loader.dataset.plan.rank, loader.dataset.plan.world_size) == (1, 3)
    got = [p.id for batch in loader for p in batch]
    assert got == ids(make_pairs(10))[2:4]  # unshuffled: rank 1 of 3 holds the second block of the one full round
