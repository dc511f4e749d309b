"""Training streams its shards: it reads what its steps need, the same global batches on any number of
ranks and workers, and a resumed run continues with the next sample."""

import json

import pytest
from safetensors.torch import load_file

from ear_dist.config import load_config
from ear_dist.data.pairs import PromptPair
from ear_dist.data.readers import PairReadError, read_pairs
from ear_dist.data.shards import write_shards
from ear_dist.data.stream import ShardPairStream, open_pair_stream
from ear_dist.train.trainer import run_erase

OBJECTS = ["barn", "castle", "windmill", "house"]


def church_pairs(n, tokens=False, grid=16, codebook=64):
    pairs = []
    for i in range(n):
        pair = PromptPair(f"a church number {i}", f"a {OBJECTS[i % 4]} number {i}", "church", OBJECTS[i % 4])
        if tokens:
            pair.surrogate_tokens = [(i * 7 + j) % codebook for j in range(grid)]
        pairs.append(pair)
    return pairs


def data_cfg(shard_dir, *overrides):
    return load_config(overrides=[f"data.pairs={shard_dir}", *overrides])


def batches(stream, steps):
    """The pair ids of ``steps`` global batches (None where this stream did not read the slice)."""
    return [[p.id if p is not None else None for p in stream.next().pairs] for _ in range(steps)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(church_pairs(30, tokens=True), out, max_samples_per_shard=7)  # 7,7,7,7,2: uneven
    return out


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_global_batches_do_not_depend_on_the_number_of_ranks_or_workers(shard_dir, mode):
    """What a user would see otherwise: 1 GPU and 8 GPUs train a run of the same config on other pairs."""
    steps, k = 18, 4  # 72 positions over 30 samples: the stream crosses epochs
    cfg = data_cfg(shard_dir, "data.shuffle_buffer=5", f"data.shards.mode={mode}", "data.shards.seed=3",
                   f"train.pairs_per_step={k}")
    alone = ShardPairStream(cfg, 1, [0])
    reference = batches(alone, steps)
    alone.close()
    for world, workers in ((2, 0), (2, 2), (4, 1)):
        cfg.data.num_workers = workers
        per_rank = [ShardPairStream(cfg, world, [r]) for r in range(world)]
        got = [batches(s, steps) for s in per_rank]
        for s in per_rank:
            s.close()
        merged = [[next(ids[step][i] for ids in got if ids[step][i] is not None) for i in range(k)]
                  for step in range(steps)]
        assert merged == reference, (world, workers)
        for r, ids in enumerate(got):  # each rank read its own contiguous slice and nothing else
            slice_size = k // world
            assert all(all((p is None) != (r * slice_size <= i < (r + 1) * slice_size) for i, p in enumerate(row))
                       for row in ids)


def test_pairs_in_file_order_give_the_batches_of_the_same_pairs_streamed_from_shards(tmp_path):
    """data.shuffle=false: a pairs file and the same pairs written to shards train on the same global batches,
    across epochs whose last batch is filled from the epoch's start (30 pairs, 4 per step), and every pair trains."""
    pairs = church_pairs(30)
    for i, p in enumerate(pairs):
        p.id = f"p{i}"
    write_shards(pairs, tmp_path / "shards", max_samples_per_shard=7)
    steps = 20
    cfg = data_cfg(tmp_path / "shards", "data.shuffle=false", "train.pairs_per_step=4")
    streamed = ShardPairStream(cfg, 1, [0])
    from_shards = batches(streamed, steps)
    streamed.close()
    in_memory, _ = open_pair_stream(cfg, pairs=pairs)
    from_memory = batches(in_memory, steps)
    assert from_memory == from_shards
    assert from_memory[7] == ["p28", "p29", "p0", "p1"] and from_memory[8] == ["p0", "p1", "p2", "p3"]
    assert {i for row in from_memory[:8] for i in row} == {p.id for p in pairs}


def test_an_exact_epoch_shows_every_pair_once_before_any_repeats(shard_dir):
    cfg = data_cfg(shard_dir, "data.shuffle_buffer=5", "train.pairs_per_step=5")
    stream = ShardPairStream(cfg, 1, [0])
    ids = [i for row in batches(stream, 6) for i in row]
    stream.close()
    assert sorted(ids) == sorted(p.id for p in church_pairs(30))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_with_the_next_sample(shard_dir, workers):
    cfg = data_cfg(shard_dir, "data.shuffle_buffer=4", f"data.num_workers={workers}", "train.pairs_per_step=4")
    whole = ShardPairStream(cfg, 2, [0, 1])
    reference = batches(whole, 16)
    whole.close()
    first = ShardPairStream(cfg, 2, [0, 1])
    assert batches(first, 9) == reference[:9]
    state = first.state_dict()
    first.close()
    assert state == {"step": 9, "epoch": 1, "consumed": 4}  # epoch 0 holds 32 positions (30 + 2 wrapped)
    resumed = ShardPairStream(cfg, 2, [0, 1])
    resumed.load_state_dict(state)
    assert batches(resumed, 7) == reference[9:]
    resumed.close()


def test_a_run_reads_only_the_shards_its_steps_need(tmp_path, tiny_checkpoint):
    """Before, every shard was read into memory before step 0: a damaged last shard stopped a 2-step run."""
    shards = tmp_path / "shards"
    write_shards(church_pairs(40, tokens=True), shards, max_samples_per_shard=4)
    last = shards / "pairs-000009.tar"
    last.write_bytes(last.read_bytes()[:3000])
    with pytest.raises(PairReadError, match="pairs-000009.tar"):
        read_pairs(shards)  # reading everything meets the damage
    cfg = load_config(overrides=[f"model.path={tiny_checkpoint}", f"data.pairs={shards}", "data.shuffle=false",
                                 f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "train.pairs_per_step=2",
                                 "erase.window_len=4", "trainable.first_k_layers=1"])
    summary = run_erase(cfg, progress=False)
    assert summary["steps"] == 2 and summary["replaced_samples"] == 0


def test_a_resumed_run_on_shards_gives_the_uninterrupted_delta(tmp_path, tiny_checkpoint):
    shards = tmp_path / "shards"
    write_shards(church_pairs(10, tokens=True), shards, max_samples_per_shard=3)

    def cfg(name):
        return load_config(overrides=[
            f"model.path={tiny_checkpoint}", f"data.pairs={shards}", f"train.out_dir={tmp_path / name}",
            "train.steps=6", "train.pairs_per_step=2", "train.checkpoint_every=2", "erase.window_len=4",
            "optim.lr=1e-2", "trainable.first_k_layers=1", "data.shuffle_buffer=3"])

    uninterrupted = run_erase(cfg("whole"), progress=False)
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] == 4

    stopped = run_erase(cfg("split"), progress=False, should_stop=stop_after_four)
    assert stopped["stopped"] and stopped["step"] == 4
    state = json.loads((tmp_path / "split" / "checkpoint" / "step-00000004" / "state.json").read_text())
    assert state["data"] == {"step": 4, "epoch": 0, "consumed": 8}  # the next sample is the 9th of epoch 0
    resumed = run_erase(cfg("split"), progress=False)
    assert resumed["resumed_from"] == 4
    a, b = load_file(uninterrupted["delta"]), load_file(resumed["delta"])
    assert a.keys() == b.keys() and all((a[n] == b[n]).all() for n in a)


def test_the_run_reports_its_data_wait(tmp_path, tiny_checkpoint, shard_dir):
    cfg = load_config(overrides=[f"model.path={tiny_checkpoint}", f"data.pairs={shard_dir}", "data.num_workers=1",
                                 f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "erase.window_len=4",
                                 "trainable.first_k_layers=1"])
    summary = run_erase(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all(0 <= line["time/data_wait_s"] <= line["time/step_s"] for line in lines)
    assert all(line["memory/rss_gib"] > 0 for line in lines)
    assert 0 <= summary["data_wait_seconds"] < summary["seconds"]
    assert 0 <= summary["data_wait_share"] < 1 and summary["rss_start_gib"] > 0


def test_pair_files_are_read_whole_into_memory(tmp_path):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("\n".join(json.dumps(p.to_dict()) for p in church_pairs(5)))
    stream, _ = open_pair_stream(load_config(overrides=[f"data.pairs={pairs_file}", "train.pairs_per_step=2"]))
    assert len(stream.pairs) == 5 and len(stream.next().pairs) == 2
