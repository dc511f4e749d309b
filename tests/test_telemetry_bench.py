"""`ear-dist bench` on the tiny model: runs end to end on CPU, counts FLOPs from the passes the
step really makes, and leaves TensorBoard and JSON-lines files that read back (no timing assertions)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ear_dist.cli import main
from ear_dist.config import load_config
from ear_dist.models.janus import load_janus
from ear_dist.bench.erase import bench_pairs, run_erasure_bench
from ear_dist.telemetry.flops import frozen_forward_flops_per_token, janus_flops_shape, rollout_flops, train_flops_per_token
from ear_dist.telemetry.timer import STUDENT_FWD_BWD, TEACHER_ROLLOUT, TEACHER_TARGETS
from ear_dist.telemetry.writer import read_jsonl


def tiny_cfg(**erase):
    overrides = [f"erase.{k}={v}" for k, v in erase.items()]
    overrides += ["model.path=tiny", "trainable.first_k_layers=2", "train.pairs_per_step=2"]
    return load_config(overrides=overrides)


def prompt_lengths(concept: str, pairs: int, step: int) -> tuple[int, int, int]:
    bundle = load_janus("tiny", device="cpu", dtype="float32")
    batch = bench_pairs(concept, pairs, step)
    rollout_len = bundle.encode_prompts(batch.surrogate_prompts)[0].shape[1]
    pair_len = bundle.encode_prompts(batch.target_prompts + batch.surrogate_prompts)[0].shape[1]
    target_len = bundle.encode_prompts(batch.target_prompts)[0].shape[1]
    return rollout_len, pair_len, target_len


@pytest.mark.parametrize("update_mode,target_mode,window_prefix", [
    ("sequence", "hidden", "recompute"), ("window", "hidden", "recompute"), ("sequence", "logit", "recompute"),
    ("window", "hidden", "cached")])
def test_flops_follow_the_passes_of_the_step(tmp_path, update_mode, target_mode, window_prefix):
    # threshold 0 keeps every window, so every student forward is followed by a backward
    cfg = tiny_cfg(update_mode=update_mode, target_mode=target_mode, window_len=4, loss_threshold=0,
                   window_prefix=window_prefix)
    result = run_erasure_bench(cfg, steps=1, warmup=0, log_dir=tmp_path, echo=lambda *_: None)
    shape = janus_flops_shape(load_janus("tiny").model.config)
    rollout_len, pair_len, target_len = prompt_lengths("church", 2, 0)
    b, t = 2, 16  # pairs per step, image tokens of the tiny preset

    counts = result.counts
    assert counts.flops[TEACHER_ROLLOUT] == rollout_flops(shape, rollout_len, t, batch_size=b, guided=True)
    targets_seq = pair_len + t - 1
    assert counts.flops[TEACHER_TARGETS] == 2 * b * targets_seq * frozen_forward_flops_per_token(shape, targets_seq)
    if update_mode == "sequence":
        prefixes = [t]
    else:  # one forward per window of 4 over a growing prefix
        prefixes = [4, 8, 12, 16]
    expected = sum(b * (target_len + p - 1) * train_flops_per_token(shape, target_len + p - 1) for p in prefixes)
    if window_prefix == "cached":  # the prompt with the first window, then 4 new tokens attending to the cache
        expected = b * (target_len + 3) * train_flops_per_token(shape, target_len + 3) + sum(
            b * 4 * train_flops_per_token(shape, target_len + p - 1) for p in prefixes[1:])
    assert counts.flops[STUDENT_FWD_BWD] == expected
    # the partial backward (layers 0-1 of 4 trainable) executes fewer FLOPs than the 6N convention
    assert 0 < counts.executed_flops[STUDENT_FWD_BWD] < expected
    assert counts.tokens == {TEACHER_ROLLOUT: b * t, TEACHER_TARGETS: b * t, STUDENT_FWD_BWD: b * t}
    assert result.image_tokens_per_step == b * t


def test_masked_windows_count_forward_only(tmp_path):
    # a threshold no window reaches: forwards happen, no backward, no optimizer step
    cfg = tiny_cfg(update_mode="sequence", window_len=4, loss_threshold=1e9)
    result = run_erasure_bench(cfg, steps=1, warmup=0, log_dir=tmp_path, echo=lambda *_: None)
    shape = janus_flops_shape(load_janus("tiny").model.config)
    _, _, target_len = prompt_lengths("church", 2, 0)
    seq = target_len + 16 - 1
    assert result.counts.flops[STUDENT_FWD_BWD] == 2 * seq * frozen_forward_flops_per_token(shape, seq)
    assert "optimizer" not in result.timing.phases


def test_cli_bench_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--steps", "2", "--warmup", "1", "--out", str(out),
               "--set", "model.path=tiny", "--set", "erase.window_len=8", "--set", "trainable.first_k_layers=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "device: cpu, float32, peak FLOP/s unknown (MFU n/a)" in printed
    table_rows = {line.split()[0] for line in printed.splitlines() if line.strip()}
    for phase in ("data_wait", "teacher_rollout", "teacher_targets", "student_fwd_bwd", "loss", "step"):
        assert phase in table_rows, printed
    assert "peak memory:" in printed and "process peak RSS" in printed
    assert "NVML: n/a" in printed

    records = list(read_jsonl(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["mfu/student_fwd_bwd"] is None for r in records)  # no CPU peak: MFU unknown, not made up
    assert all(r["throughput/image_tokens_per_s"] > 0 for r in records)
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "time/step_ms", "time/teacher_rollout_ms", "throughput/image_tokens_per_s"} <= tags
    assert [e.value for e in acc.Scalars("throughput/pairs_per_s")] == pytest.approx(
        [r["throughput/pairs_per_s"] for r in records]
    )


def test_cli_compare_prints_ratio_rows(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["bench", "--steps", "1", "--warmup", "0", "--out", str(out), "--set", "model.path=tiny",
               "--set", "erase.window_len=8", "--compare", "erase.update_mode=window,sequence"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "comparison in one run, erase.update_mode: baseline window, candidate sequence" in printed
    ratio_lines = {line.split()[0]: line for line in printed.split("comparison in one run")[1].splitlines()[1:]}
    for row in ("step", "image", "teacher_rollout", "student_fwd_bwd"):
        assert row in ratio_lines and ratio_lines[row].rstrip().endswith("x"), printed
    # each side keeps its own metrics
    assert len(list(read_jsonl(out / "erase.update_mode=window" / "metrics.jsonl"))) == 1
    assert len(list(read_jsonl(out / "erase.update_mode=sequence" / "metrics.jsonl"))) == 1


def test_cli_compare_bad_spec_is_a_clear_error(tmp_path, capsys):
    rc = main(["bench", "--out", str(tmp_path), "--compare", "erase.update_mode=window"])
    assert rc == 2
    assert "expected KEY=BASELINE,CANDIDATE" in capsys.readouterr().err


def test_presets_without_tokenizer_run_on_synthetic_prompt_ids(tmp_path, monkeypatch):
    import ear_dist.bench.erase as bench_mod
    from ear_dist.bench.erase import SyntheticPromptBundle
    from ear_dist.models.family import JanusModel

    def tiny_without_tokenizer(*args, **kwargs):
        bundle = load_janus("tiny", device="cpu", dtype="float32")
        bundle.tokenizer = None  # like janus-pro-7b built with random weights
        return bundle

    monkeypatch.setattr(bench_mod, "load_job_model", lambda model_cfg, rt: JanusModel.of(tiny_without_tokenizer()))
    notes = []
    result = run_erasure_bench(tiny_cfg(update_mode="sequence", window_len=4, loss_threshold=0), steps=1, warmup=0, log_dir=tmp_path,
                               prompt_len=7, echo=notes.append)
    assert any("no tokenizer" in n for n in notes)
    shape = janus_flops_shape(load_janus("tiny").model.config)
    seq = 7 + 16 - 1  # every prompt is exactly prompt_len ids
    assert result.counts.flops[STUDENT_FWD_BWD] == 2 * seq * train_flops_per_token(shape, seq)

    bundle = SyntheticPromptBundle(**{k: getattr(tiny_without_tokenizer(), k)
                                      for k in ("model", "tokenizer", "prompt_format", "name")})
    bundle.prompt_len = 7
    ids, mask = bundle.encode_prompts(["a photo of a church", "a photo of a house", "a photo of a church"])
    assert ids.shape == (3, 7) and bool(mask.all())
    assert bool((ids[:, 0] == bundle.prompt_format.bos_token_id).all())
    assert bool((ids[:, -1] == bundle.prompt_format.boi_token_id).all())
    assert torch.equal(ids[0], ids[2]) and not torch.equal(ids[0], ids[1])  # seeded by the prompt text


@pytest.mark.dist
@pytest.mark.slow
def test_bench_on_two_ranks_with_a_dedicated_teacher_scales_against_one_rank(tmp_path):
    """torchrun, 2 gloo ranks: rank 0 serves the teacher, rank 1 trains; the student rank prints the
    per-rank table and the scaling against the same bench on one rank (where the teacher is colocated)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    common = ["--steps", "2", "--warmup", "1", "--set", "model.path=tiny", "--set", "erase.window_len=8",
              "--set", "trainable.first_k_layers=2", "--set", "dist.teacher_placement=dedicated"]
    one = subprocess.run([sys.executable, "-m", "ear_dist", "bench", "--out", str(tmp_path / "one"), *common],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "one rank: dist.teacher_placement=dedicated runs as colocated" in one.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "ear_dist", "bench", "--out", str(tmp_path / "two"),
                          "--baseline", str(tmp_path / "one" / "bench.json"), *common],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("figures of each of the 1 student ranks") == 1  # printed once, by the student
    assert "communication: n/a (no DeepSpeed collectives to time)" in two.stdout
    result = json.loads((tmp_path / "two" / "bench.json").read_text())
    baseline = json.loads((tmp_path / "one" / "bench.json").read_text())
    assert (result["ranks"], result["student_ranks"], baseline["ranks"]) == (2, 1, 1)
    # two GPUs, one of them training: per GPU is half of what the student rank trains
    assert result["image_tokens_per_s_per_gpu"] == pytest.approx(result["image_tokens_per_s"] / 2)
    assert result["scaling_efficiency"] == pytest.approx(
        result["image_tokens_per_s_per_gpu"] / baseline["image_tokens_per_s_per_gpu"])
    assert f"scaling efficiency: {100 * result['scaling_efficiency']:.1f}%" in two.stdout


def test_a_baseline_that_is_not_a_one_rank_bench_is_a_clear_error(tmp_path):
    import json

    from ear_dist.bench.scaling import read_baseline, rank_spread
    from ear_dist.errors import InputError

    with pytest.raises(InputError, match="run `ear-dist bench` on one rank first"):
        read_baseline(tmp_path / "missing.json")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"ranks": 4, "image_tokens_per_s_per_gpu": 10.0}))
    with pytest.raises(InputError, match="measured on 4 ranks; the baseline is the bench on one rank"):
        read_baseline(path)
    path.write_text(json.dumps({"ranks": 1}))
    with pytest.raises(InputError, match="key 'image_tokens_per_s_per_gpu' missing"):
        read_baseline(path)
    # one process: the spread of a figure is the figure; a figure no rank has stays unknown
    spread = rank_spread({"step_ms": 12.5, "power_w": None})
    assert (spread["step_ms"].mean, spread["step_ms"].min, spread["step_ms"].max) == (12.5, 12.5, 12.5)
    assert spread["power_w"] is None
