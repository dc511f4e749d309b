"""Faults injected for real: a rank killed with SIGKILL, a process killed while writing a checkpoint, a disk
that fills (RLIMIT_FSIZE), shards truncated or corrupted under a running job. Each ends in one clear line
and a documented exit code, leaves nothing half-written looking complete, and a rerun resumes."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ear_dist.data.pairs import PromptPair
from ear_dist.data.shards import write_shards

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
OBJECTS = ["barn", "castle", "windmill", "house"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        if k not in extra:
            env.pop(k, None)
    return env


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b):
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all((ta[n] == tb[n]).all() for n in ta)


def church_pairs(n, tokens=True):
    pairs = []
    for i in range(n):
        pair = PromptPair(f"a church number {i}", f"a {OBJECTS[i % 4]} number {i}", "church", OBJECTS[i % 4])
        if tokens:
            pair.surrogate_tokens = [(i * 5 + j) % 64 for j in range(16)]
        pairs.append(pair)
    return pairs


def erase(overrides, timeout=300, env=None, preexec_fn=None, script=None):
    cmd = [sys.executable, *([str(script)] if script else ["-m", "ear_dist", "erase"]), "--no-progress",
           *_sets(overrides)]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def last_line(text):
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fault-shards")
    write_shards(church_pairs(24), out, max_samples_per_shard=4)  # 6 shards
    return out


def common(model, data, out, *extra):
    return [f"model.path={model}", f"data.pairs={data}", f"train.out_dir={out}", "erase.window_len=4",
            "trainable.first_k_layers=1", "optim.lr=1e-2", "erase.loss_threshold=0", "train.pairs_per_step=2",
            *extra]


# ----------------------------------------------------------------------------- a rank killed


@pytest.mark.dist
def test_a_rank_killed_with_sigkill_stops_the_other_and_the_rerun_resumes_bitwise(tmp_path, tiny_checkpoint,
                                                                                  shards):
    steps = ["train.steps=6", "train.checkpoint_every=1", "dist.deepspeed_config=ds_configs/zero2.json",
             "dist.timeout_s=30", "erase.update_mode=sequence"]
    out = tmp_path / "killed"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "ear_dist", "erase", "--no-progress",
               *_sets(common(tiny_checkpoint, shards, out, *steps))]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint" / "step-00000002").is_dir():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint of step 2 appeared"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err0 = procs[0].communicate(timeout=30 + 60)  # dist.timeout_s, plus start-up slack on a loaded machine
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        procs[1].communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1, err0[-3000:]
    line = last_line(err0)
    assert line.startswith("ear-dist: error (rank 0 of 2): rank 0: a collective failed at step "), line
    assert "another rank died or did not answer within dist.timeout_s=30 s" in line
    assert waited < 30 + 60

    reference = tmp_path / "uninterrupted"
    for target in (out, reference):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={_free_port()}", "-m", "ear_dist", "erase", "--no-progress",
                              *_sets(common(tiny_checkpoint, shards, target, *steps))],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_from"] >= 2
    assert _same(out / "delta.safetensors", reference / "delta.safetensors")


# ----------------------------------------------------------------------------- killed while checkpointing


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_which_the_rerun_resumes(tmp_path,
                                                                                         tiny_checkpoint, shards):
    args = common(tiny_checkpoint, shards, tmp_path / "run", "train.steps=6", "train.checkpoint_every=2")
    res = erase(args, env=_env(KILL_AT_STEP="4"), script=ROOT / "tests" / "dist_scripts" / "kill_during_checkpoint.py")
    assert res.returncode == -signal.SIGKILL and "killing myself while writing" in res.stderr
    root = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004.tmp"]
    assert not (tmp_path / "run" / "delta.safetensors").exists()

    res = erase(args)  # at once: the dead run's lock does not stand in the way
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{tmp_path / 'run' / '.lock'}: the run that held it (pid " in res.stderr
    assert "is gone; taking it over" in res.stderr
    assert f"resuming from {root / 'step-00000002'} at step 2" in res.stderr
    assert json.loads(res.stdout)["resumed_from"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006"]  # the leftover is gone
    whole = erase(common(tiny_checkpoint, shards, tmp_path / "whole", "train.steps=6"))
    assert whole.returncode == 0
    assert _same(tmp_path / "run" / "delta.safetensors", tmp_path / "whole" / "delta.safetensors")


# ----------------------------------------------------------------------------- Ctrl-C


def _start_and_interrupt(args, signals):
    """Start ``ear-dist erase``, send ``signals`` once its first step is in metrics.jsonl; (exit, stderr)."""
    out = Path(args[2].split("=", 1)[1])
    proc = subprocess.Popen([sys.executable, "-m", "ear_dist", "erase", "--no-progress", *_sets(args)], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            time.sleep(0.2)
        for sig in signals:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_ctrl_c_stops_at_the_end_of_the_step_with_a_checkpoint_and_one_line(tmp_path, tiny_checkpoint, shards):
    args = common(tiny_checkpoint, shards, tmp_path / "run", "train.steps=200")
    code, err = _start_and_interrupt(args, [signal.SIGINT])
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = last_line(err)
    assert line.startswith("ear-dist: stopped by SIGINT after step ") and line.endswith("run the same command to resume")
    step = int(line.split("after step ")[1].split(",")[0])
    assert (tmp_path / "run" / "checkpoint" / f"step-{step:08d}" / "state.json").is_file()
    res = erase([*args[:-1], f"train.steps={step + 1}"])  # the rerun resumes where it stopped
    assert res.returncode == 0 and json.loads(res.stdout)["resumed_from"] == step


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, tiny_checkpoint, shards):
    args = common(tiny_checkpoint, shards, tmp_path / "run", "train.steps=200", "erase.update_mode=window")
    code, err = _start_and_interrupt(args, [signal.SIGINT, signal.SIGINT])
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert last_line(err).startswith("ear-dist: ") and "SIGINT" in last_line(err)


# ----------------------------------------------------------------------------- a disk that fills


def file_size_limit(n_bytes):
    """For preexec_fn: files may not grow past ``n_bytes``; writes fail with EFBIG instead of a signal."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    return apply


def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_no_finished_looking_shard(tmp_path):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs = church_pairs(40)
    for p in pairs:
        p.surrogate_tokens = list(range(576))
    pairs_file.write_text("\n".join(json.dumps(p.to_dict()) for p in pairs))
    out = tmp_path / "shards"
    res = subprocess.run([sys.executable, "-m", "ear_dist", "data", "build", "--pairs", str(pairs_file), "--out",
                          str(out), "--set", "data.shards.max_samples_per_shard=8"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(20_000))
    assert res.returncode == 1, res.stderr[-3000:]
    line = last_line(res.stderr)
    # shards are written into a temp sibling that is renamed into place only when the whole set is written
    assert line.startswith(f"ear-dist: error: {tmp_path}/.shards.tmp/pairs-0000") and "File too large [EFBIG] " \
        "(disk full or a file size limit); nothing was left half-written" in line, line
    assert not out.exists()  # no shard directory that looks finished
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if n.endswith(".tmp")], left  # and no temp directory left behind


def test_a_full_disk_while_checkpointing_keeps_the_run_resumable(tmp_path, tiny_checkpoint, shards):
    # the trainable tensors of 1 layer's attention: 4 x 64 x 64 floats = 64 KiB, more than the limit
    args = common(tiny_checkpoint, shards, tmp_path / "run", "train.steps=4", "train.checkpoint_every=2")
    res = erase(args, preexec_fn=file_size_limit(40_000))
    assert res.returncode == 1, res.stderr[-3000:]
    line = last_line(res.stderr)
    assert line.startswith(f"ear-dist: error: {tmp_path / 'run' / 'checkpoint' / 'step-00000002.tmp'}/") and \
        "[EFBIG]" in line
    assert not (tmp_path / "run" / "checkpoint").exists() or not list((tmp_path / "run" / "checkpoint").iterdir())
    assert not (tmp_path / "run" / "delta.safetensors").exists()
    res = erase(args)  # space again: the same command trains the run from its start
    assert res.returncode == 0 and json.loads(res.stdout)["resumed_from"] == 0


def test_a_full_disk_while_writing_the_delta_leaves_no_delta(tmp_path, tiny_checkpoint, shards):
    out = tmp_path / "run"
    res = erase(common(tiny_checkpoint, shards, out, "train.steps=2"), preexec_fn=file_size_limit(40_000))
    assert res.returncode == 1, res.stderr[-3000:]
    assert last_line(res.stderr).startswith(f"ear-dist: error: {out / 'delta.safetensors'}: cannot write: File too "
                                            "large [EFBIG]")
    assert not list(out.glob("delta.safetensors*")) and not (out / "summary.json").exists()
    assert json.loads((out / "run.json").read_text())["finished_step"] is None  # not recorded as finished


# ----------------------------------------------------------------------------- shards damaged under a run


@pytest.fixture()
def damaged(tmp_path):
    """Shards in index order (data.shuffle=false), shard 2 truncated and shard 4's first JSON member garbled."""
    out = tmp_path / "damaged"
    write_shards(church_pairs(24), out, max_samples_per_shard=4)
    truncated = out / "pairs-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:2500])
    garbled = out / "pairs-000004.tar"
    data = bytearray(garbled.read_bytes())
    start = data.index(b'{"id"')
    data[start:start + 5] = b"#####"
    garbled.write_bytes(bytes(data))
    return out


def test_a_truncated_shard_met_while_streaming_stops_the_run_naming_it(tmp_path, tiny_checkpoint, damaged):
    res = erase(common(tiny_checkpoint, damaged, tmp_path / "run", "train.steps=6", "data.shuffle=false"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert last_line(res.stderr) == (f"ear-dist: error: {damaged / 'pairs-000002.tar'}: is 2500 bytes, the index "
                                     "says 10240 (truncated or rewritten)")


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_shards_are_skipped_counted_and_named_with_on_corrupt_skip(tmp_path, tiny_checkpoint, damaged,
                                                                           workers):
    res = erase(common(tiny_checkpoint, damaged, tmp_path / "run", "train.steps=12", "data.shuffle=false",
                       "data.shards.on_corrupt=skip", f"data.num_workers={workers}"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["replaced_samples"] == 5  # shard 2's 4 samples and shard 4's first
    warnings = [ln for ln in res.stderr.splitlines() if "skipping unreadable data" in ln]
    assert len(warnings) == 2 and "pairs-000002.tar: is 2500 bytes" in warnings[0]
    assert "pairs-000004.tar: sample #0: json:" in warnings[1]
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["data/replaced_samples"] == 5
