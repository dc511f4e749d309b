"""`ear-dist world build`: the world's tiny Janus trains, is cached by config, and loads back."""

import json

import pytest
import torch

from ear_dist.cli import main
from ear_dist.config import WorldConfig
from ear_dist.models.janus import load_janus
from ear_dist.world import World
from ear_dist.world.pretrain import (BUILD_INFO_FILE, build_hash, build_world_model, cache_root,
                                     pretraining_thread_count)

# a model small enough to train a few steps in seconds on one core
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=8,
             eval_prompts_per_word=3, calibration_samples=400)


def small_config(tmp_path, **changes) -> WorldConfig:
    return WorldConfig(cache_dir=str(tmp_path / "cache"), **{**SMALL, **changes})


def test_cache_key_follows_world_and_model_settings(tmp_path, monkeypatch):
    base = World(small_config(tmp_path))
    assert build_hash(base) == build_hash(World(small_config(tmp_path)))
    assert build_hash(base) != build_hash(World(small_config(tmp_path, seed=1)))
    assert build_hash(base) != build_hash(World(small_config(tmp_path, hidden_size=64)))
    assert build_hash(base) != build_hash(World(small_config(tmp_path, lr=1e-4)))
    monkeypatch.setenv("EAR_DIST_CACHE", str(tmp_path / "env"))
    assert cache_root(WorldConfig()) == tmp_path / "env" / "world"
    assert cache_root(WorldConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_build_saves_a_checkpoint_that_loads_and_is_reused(tmp_path):
    cfg = small_config(tmp_path, max_steps=4, eval_every=2)
    path, info = build_world_model(cfg, progress=False, log=lambda _: None)
    assert path.parent == tmp_path / "cache" and (path / BUILD_INFO_FILE).is_file()
    assert info["steps"] == 4 and [h["step"] for h in info["history"]] == [2]  # progress checks before the end
    assert {"church (chapel)", "church (cathedral)", "van gogh", "monet"} <= set(info["accuracy"])
    assert not info["reached_target"] and info["mean_accuracy"] < info["target_accuracy"]
    # the third, independent held-out set covers the same concepts
    assert set(info["confirmation_accuracy"]) == set(info["accuracy"])
    bundle = load_janus(str(path), device="cpu", dtype="float32")
    assert bundle.num_image_tokens == 64 and bundle.codebook_size == 256
    world = World(cfg)
    ids, _ = bundle.encode_prompts(world.sample(20, "all", stream=3).prompts)
    assert not (ids == bundle.tokenizer.unk_token_id).any(), "a world word is missing from the tokenizer"
    # the second build is the cached one: same directory, nothing retrained
    messages = []
    weights = sorted(path.glob("*.safetensors"))[0]
    before = weights.stat().st_mtime_ns
    path2, info2 = build_world_model(cfg, progress=False, log=messages.append)
    assert path2 == path and info2 == json.loads((path / BUILD_INFO_FILE).read_text())
    assert weights.stat().st_mtime_ns == before and "cached" in messages[0]


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_pretraining_lowers_the_text_to_image_loss(tmp_path):
    from ear_dist.models.janus import teacher_forced
    from ear_dist.world.pretrain import pretrain

    cfg = small_config(tmp_path, max_steps=40, eval_every=40, lr=3e-3, warmup_steps=5)
    world = World(cfg)
    held = world.sample(32, "heldout", stream=77)

    def loss(bundle):
        ids, mask = bundle.encode_prompts(held.prompts)
        tokens = torch.from_numpy(held.tokens)
        with torch.no_grad():
            _, logits = teacher_forced(bundle.model, ids, mask, tokens)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)).item()

    from ear_dist.world.pretrain import _new_model

    initial = loss(_new_model(world))
    bundle, info = pretrain(world, progress=False, log=lambda _: None)
    assert loss(bundle) < initial - 0.3, (initial, loss(bundle))


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_cli_build_reports_accuracy_and_fails_when_the_target_is_missed(tmp_path, capsys):
    sets = [f"world.{k}={v}" for k, v in SMALL.items()]
    sets += [f"world.cache_dir={tmp_path / 'cache'}", "world.max_steps=2", "world.eval_every=2"]
    argv = ["world", "build", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    rc = main(argv)
    out = capsys.readouterr().out
    assert "church (chapel)" in out and "world model:" in out
    # an untrained model cannot draw the concepts: the command says so and exits non-zero
    assert rc == 1 and "MISSED its pretraining target" in out


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first to run waits for the session's default world build
def test_default_world_build_draws_every_concept(default_world_model):
    """The default build reaches its target: the classifier recognises every object (each synonym on its
    own) and style in the model's own CFG samples of held-out prompts, on two held-out sets pooled
    (every concept >= 0.90, mean >= 0.95), and a third set drawn once stays above 0.85 everywhere.

    The build trains a fixed number of steps; it used to stop on the first 18-prompts-per-word check
    at 0.95, which made the model a matter of luck (builds on other machines stopped on a lucky check,
    or never stopped).
    """
    from ear_dist.world.pretrain import required_concepts

    cfg, _, info = default_world_model
    for key, bound in (("accuracy", 0.90), ("confirmation_accuracy", 0.85)):
        required = required_concepts(info[key])
        assert {"church (chapel)", "church (cathedral)", "cinema", "windmill", "van gogh", "monet"} <= set(required)
        assert min(required.values()) >= bound, (key, required)
    assert info["reached_target"], info["mean_accuracy"]
    assert info["torch_threads"] == pretraining_thread_count(cfg)


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_build_is_reproducible_whatever_the_ambient_thread_count(tmp_path):
    """Pretraining runs with world.threads threads, so the weights do not depend on the caller's setting."""
    from ear_dist.world.pretrain import pretrain, pretraining_thread_count

    # wide enough that matmuls split their sums over threads (at hidden 32 they do not)
    cfg = small_config(tmp_path, max_steps=4, eval_every=4, hidden_size=128, intermediate_size=256, batch_size=32)
    weights = []
    ambient = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            bundle, info = pretrain(World(cfg), progress=False, log=lambda _: None)
            assert info["torch_threads"] == pretraining_thread_count(cfg) and torch.get_num_threads() == threads
            weights.append({k: v.clone() for k, v in bundle.model.state_dict().items()})
    finally:
        torch.set_num_threads(ambient)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_pretraining_threads_come_from_the_config_capped_at_the_cpus_given(tmp_path, monkeypatch):
    """The caller's OMP_NUM_THREADS does not change the build; a process given fewer CPUs than world.threads
    builds on as many threads as it has (another model, under its own cache key) instead of oversubscribing."""
    cfg = small_config(tmp_path, threads=2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")  # no container CPU limit
    monkeypatch.setattr("ear_dist.world.pretrain.CGROUP_CPU_MAX", quota)
    assert pretraining_thread_count(cfg) == 2
    wide = build_hash(World(cfg))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert pretraining_thread_count(cfg) == 1 and build_hash(World(cfg)) != wide
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota.write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert pretraining_thread_count(cfg) == 2
    quota.write_text("100000 100000\n")
    assert pretraining_thread_count(cfg) == 1
    quota.write_text("max 100000\n")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert pretraining_thread_count(small_config(tmp_path, threads=4)) == 2


def test_ear_dist_makes_idle_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    """Importing ear_dist (before torch, as the CLI does) sets OMP_WAIT_POLICY=PASSIVE; a user's value wins."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = "import os, ear_dist; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first to run waits for the session's default world build
def test_small_erasure_on_the_world_erases_more_than_it_damages(default_world_model, tmp_path):
    """The real erase path on the world model: church on held-out sentences and synonyms drops by more
    than preservation of the other objects does."""
    from ear_dist.world.erasure import WORLD_ERASE
    from ear_dist.world.erasure import run_world_erasure
    from ear_dist.world.world import World

    cfg, path, _ = default_world_model
    rows = run_world_erasure(str(path), World(cfg), tmp_path / "report", "church", ["EAR"], n_pairs=16, n_eval=24,
                             overrides=WORLD_ERASE, progress=False, log=lambda *_: None)
    before, after = rows["before"], rows["EAR"]
    gain = after.erasure_all_groups - before.erasure_all_groups
    damage = before.preservation_hit_rate - after.preservation_hit_rate
    assert gain > 0.3 and gain > damage, (before, after)
    assert (tmp_path / "report" / "results.md").is_file() and (tmp_path / "report" / "before_after.png").is_file()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first to run waits for the session's default world build
def test_null_space_ear_on_the_world_erases_church_and_keeps_the_rest(default_world_model, tmp_path):
    """null-space EAR on the default build: the trained word leaves held-out sentences, the other objects are kept
    (>= 0.9 of their hit rate, where the paper's EAR keeps less), church goes from the held-out groups (synonyms
    included) by more than the others lose. The README's figures are over builds, seeds and more prompts."""
    from ear_dist.world.erasure import WORLD_ERASE, run_world_erasure
    from ear_dist.world.world import World

    cfg, path, _ = default_world_model
    rows = run_world_erasure(str(path), World(cfg), tmp_path / "report", "church", ["EAR", "preserving"],
                             n_pairs=16, n_eval=24, overrides=WORLD_ERASE, progress=False, log=lambda *_: None)
    before, ns, ear = rows["before"], rows["preserving"], rows["EAR"]
    assert ns.concept_share["held-out sentences (church)"] <= 0.1, ns
    assert ns.preservation_hit_rate >= 0.9 * before.preservation_hit_rate
    assert ns.preservation_hit_rate > ear.preservation_hit_rate
    assert ns.erasure_all_groups - before.erasure_all_groups > 0.3, (before, ns)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first to run waits for the session's default world build
def test_joint_and_composed_erasure_both_erase_each_concept(default_world_model, tmp_path):
    """Two concepts (an object and a style), erased jointly and as composed per-concept deltas."""
    from ear_dist.world.erasure import WORLD_ERASE
    from ear_dist.world.erasure import run_joint_vs_composed
    from ear_dist.world.world import World

    cfg, path, _ = default_world_model
    table = run_joint_vs_composed(str(path), World(cfg), tmp_path, ["church", "van gogh"], n_pairs=16, n_eval=24,
                                  overrides=WORLD_ERASE, log=lambda *_: None)
    for model in ("joint", "composed"):
        for concept in ("church", "van gogh"):
            assert table[model][concept]["erasure_rate"] > table["before"][concept]["erasure_rate"] + 0.15, table
    assert (tmp_path / "multi_concept.md").is_file()


class _StopAt(Exception):
    pass


@pytest.mark.slow  # three short builds
def test_a_stopped_build_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """A build stopped mid-training, or after training during its judgement, loses at most the steps since its
    last progress check: rerun, it resumes from the saved state and caches the same weights bit for bit."""
    from ear_dist.world import pretrain as pt

    whole_cfg = small_config(tmp_path / "whole", max_steps=6, eval_every=2, uncond_prob=0.5)  # drops: the stream matters
    whole, whole_info = build_world_model(whole_cfg, progress=False, log=lambda _: None)
    assert not (whole.with_name(whole.name + ".partial")).exists()

    cfg = small_config(tmp_path / "stopped", max_steps=6, eval_every=2, uncond_prob=0.5)
    real_call, calls = pt.PretrainingStep.__call__, []

    def stop_at_step_5(self, step):
        calls.append(step)
        if step == 5:
            raise _StopAt
        return real_call(self, step)

    monkeypatch.setattr(pt.PretrainingStep, "__call__", stop_at_step_5)
    with pytest.raises(_StopAt):
        build_world_model(cfg, progress=False, log=lambda _: None)
    out = cache_root(cfg) / build_hash(World(cfg))
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and torch.load(partial / pt.PRETRAIN_STATE_FILE, weights_only=True)["step"] == 4

    # the rerun trains steps 5 and 6 only, then stops in the judgement: the trained model is kept
    calls.clear()
    monkeypatch.setattr(pt.PretrainingStep, "__call__", lambda self, step: (calls.append(step), real_call(self, step))[1])
    real_judge = pt.judge_build
    monkeypatch.setattr(pt, "judge_build", lambda world, bundle: (_ for _ in ()).throw(_StopAt()))
    messages = []
    with pytest.raises(_StopAt):
        build_world_model(cfg, progress=False, log=messages.append)
    assert calls == [5, 6] and any("resuming the build after step 4 of 6" in m for m in messages)
    assert torch.load(partial / pt.PRETRAIN_STATE_FILE, weights_only=True)["step"] == 6

    # the third run only judges
    calls.clear()
    monkeypatch.setattr(pt, "judge_build", real_judge)
    path, info = build_world_model(cfg, progress=False, log=lambda _: None)
    assert calls == [] and info["resumed_after_step"] == 6 and not partial.exists()
    assert [h["step"] for h in info["history"]] == [h["step"] for h in whole_info["history"]] == [2, 4]
    assert info["accuracy"] == whole_info["accuracy"]
    a = load_janus(str(whole), device="cpu", dtype="float32").model.state_dict()
    b = load_janus(str(path), device="cpu", dtype="float32").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_a_saved_state_of_another_build_is_not_resumed(tmp_path):
    from ear_dist.world import pretrain as pt

    cfg = small_config(tmp_path, max_steps=2, eval_every=2)
    out = cache_root(cfg) / build_hash(World(cfg))
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True)
    torch.save({"build_hash": "0" * 16, "step": 1}, partial / pt.PRETRAIN_STATE_FILE)
    messages = []
    path, info = build_world_model(cfg, progress=False, log=messages.append)
    assert "resumed_after_step" not in info and not any("resuming" in m for m in messages)
