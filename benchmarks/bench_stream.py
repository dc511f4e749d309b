"""Training that streams its shards: resident memory per rank stays flat whatever the data's size, and
waiting for data is a sliver of each step.

1. Writes ``--pairs`` generated prompt pairs with stored 576-token rollouts (24x24, Janus-Pro's count) into
   shards under ``--work`` (kept: a second call reuses them), and ``--small-pairs`` into a second directory.
2. Runs ``ear-dist erase`` on 2 CPU ranks (torchrun, ZeRO-2, a tiny Janus with 576 image tokens) over each
   directory for ``--steps`` steps, sampling every rank's resident set size (and its DataLoader workers')
   from /proc. Reports per rank the RSS at the first logged step and at the end.
3. Measures what reading the pairs whole took before streaming: the RSS growth of ``load_training_pairs`` on
   the small directory, per pair, times ``--pairs``.
4. The data wait: its share of the step time in the run's own metrics.jsonl (both runs, first step left out:
   DataLoader workers start there), and in ``ear-dist bench`` over the big directory (one process).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_stream.py --pairs 1000000 --steps 200

Goals: RSS growth per rank under 200 MB and the same for both data sizes; data wait under 1% of step time.
Disk: about 4.3 KB per pair (4.3 GB for a million); delete ``--work`` afterwards (``--clean`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID, CODEBOOK = 24, 64
OBJECTS = ["barn", "castle", "windmill", "house", "lighthouse", "cinema", "theater"]
PLACES = ["in snow", "at night", "by a lake", "on a hill", "in the morning", "near a road"]


def make_model(work: Path) -> Path:
    from ear_dist.models.janus import save_tiny_checkpoint

    path = work / "model-576"
    if not (path / "config.json").is_file():
        save_tiny_checkpoint(path, seed=0, grid_side=GRID, codebook_size=CODEBOOK)
    return path


def make_shards(out: Path, n: int) -> Path:
    """``n`` church pairs with stored rollouts; reused when ``out`` already holds exactly ``n``."""
    from tqdm import tqdm

    from ear_dist.data.pairs import PromptPair
    from ear_dist.data.shards import ShardWriter

    index = out / "index.json"
    if index.is_file() and json.loads(index.read_text())["total_samples"] == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    pool = np.random.default_rng(0).integers(0, CODEBOOK, size=(4096, GRID * GRID), dtype=np.int32)
    with ShardWriter(out, max_samples_per_shard=10_000) as writer:
        for i in tqdm(range(n), desc=f"writing {n:,} pairs", unit="pair", mininterval=2):
            obj, place = OBJECTS[i % len(OBJECTS)], PLACES[(i // len(OBJECTS)) % len(PLACES)]
            pair = PromptPair(f"a church {place} number {i}", f"a {obj} {place} number {i}", "church", obj)
            pair.surrogate_tokens = pool[i % len(pool)]
            writer.write(pair)
    writer.close()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _rank_of(pid: int):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class RssSampler(threading.Thread):
    """Every ``interval`` s: the RSS of each rank process (a child of torchrun) and of each rank's workers."""

    def __init__(self, launcher_pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.launcher_pid, self.interval = launcher_pid, interval
        self.samples: list[tuple[float, dict, dict]] = []  # (time, rank -> RSS, rank -> workers' RSS)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            ranks, workers = {}, {}
            try:
                for pid in _children(self.launcher_pid):
                    rank = _rank_of(pid)
                    if rank is None:
                        continue
                    ranks[rank] = _rss(pid)
                    workers[rank] = sum(_rss(c) for c in _children(pid))
            except (OSError, ValueError):
                pass  # a process ended between two reads
            if ranks:
                self.samples.append((time.monotonic(), ranks, workers))
            self.stop.wait(self.interval)


def run_ranks(model: Path, shards: Path, out: Path, steps: int, workers: int, log_every: int) -> dict:
    """``ear-dist erase`` on 2 ranks over ``shards``; RSS per rank at the first logged step and at the end."""
    shutil.rmtree(out, ignore_errors=True)
    sets = ["train.resume=never", f"model.path={model}", f"data.pairs={shards}", f"train.out_dir={out}",
            f"train.steps={steps}",
            "train.pairs_per_step=2", "erase.window_len=48", "trainable.first_k_layers=2", "erase.update_mode=sequence",
            f"data.num_workers={workers}", f"train.log_every={log_every}", "dist.deepspeed_config=ds_configs/zero2.json",
            "train.tensorboard=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "ear_dist",
           "erase", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    first_step_at = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if first_step_at is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step_at = time.monotonic()
        time.sleep(0.2)
    sampler.stop.set()
    sampler.join()
    stdout = proc.stdout.read()
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}); see {out.with_suffix('.log')}")
    summary = json.loads(stdout)
    at_start = next(s for s in sampler.samples if first_step_at is not None and s[0] >= first_step_at)
    end = sampler.samples[-1]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    measured = [m for m in lines if m["step"] > 0]
    wait, step = sum(m["time/data_wait_s"] for m in measured), sum(m["time/step_s"] for m in measured)
    workers_peak = {rank: max(s[2].get(rank, 0) for s in sampler.samples) for rank in end[1]}
    return {"rss_start": at_start[1], "rss_end": end[1], "workers_peak": workers_peak,
            "data_wait_share": wait / step, "step_ms": 1e3 * step / len(measured), "summary": summary}


def read_whole_bytes_per_pair(shards: Path) -> float:
    """RSS growth per pair of reading a shard directory whole (what training did before it streamed)."""
    code = ("import json, sys; from ear_dist.config import load_config; "
            "from ear_dist.data.stream import load_training_pairs; "
            "from ear_dist.telemetry.memory import current_rss_bytes; "
            "cfg = load_config(overrides=[f'data.pairs={sys.argv[1]}']); before = current_rss_bytes(); "
            "pairs = load_training_pairs(cfg); print(json.dumps([current_rss_bytes() - before, len(pairs)]))")
    res = subprocess.run([sys.executable, "-c", code, str(shards)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), check=True)
    grown, n = json.loads(res.stdout.strip().splitlines()[-1])
    return grown / n


def bench_data_wait(model: Path, shards: Path, out: Path, steps: int) -> float:
    """The data wait's share of the step in ``ear-dist bench`` (one process) over ``shards``."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"model.path={model}", f"data.pairs={shards}", "erase.window_len=48", "trainable.first_k_layers=2",
            "erase.update_mode=sequence", "data.num_workers=1"]
    subprocess.run([sys.executable, "-m", "ear_dist", "bench", "--steps", str(steps), "--warmup", "2", "--out",
                    str(out), *[x for s in sets for x in ("--set", s)]], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT)))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return sum(m["time/data_wait_ms"] for m in lines) / sum(m["time/step_ms"] for m in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1_000_000, help="pairs in the big shard directory")
    ap.add_argument("--small-pairs", type=int, default=10_000, help="pairs in the small one (same run)")
    ap.add_argument("--steps", type=int, default=200, help="training steps of each run (2 pairs per step)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    ap.add_argument("--bench-steps", type=int, default=20, help="measured steps of ear-dist bench")
    ap.add_argument("--work", default="/tmp/ear-dist-bench-stream", help="shards, model and runs go here")
    ap.add_argument("--clean", action="store_true", help="delete --work at the end")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    big = make_shards(work / f"shards-{args.pairs}", args.pairs)
    small = make_shards(work / f"shards-{args.small_pairs}", args.small_pairs)
    gib = 2 ** 30
    print(f"2 CPU ranks (ZeRO-2), tiny Janus with {GRID * GRID} image tokens, {args.steps} steps of 2 pairs, "
          f"{args.workers} DataLoader worker(s) per rank")
    runs = {}
    for name, shards, n in (("big", big, args.pairs), ("small", small, args.small_pairs)):
        r = runs[name] = run_ranks(model, shards, work / f"run-{name}", args.steps, args.workers,
                                   max(1, args.steps // 20))
        for rank in sorted(r["rss_start"]):
            start, end = r["rss_start"][rank], r["rss_end"][rank]
            print(f"  {n:>9,} pairs, rank {rank}: RSS {start / gib:.3f} GiB at the first step -> {end / gib:.3f} GiB "
                  f"at the end (growth {(end - start) / 2**20:+.1f} MiB); its DataLoader workers at most "
                  f"{r['workers_peak'][rank] / gib:.3f} GiB")
        print(f"  {n:>9,} pairs: data wait {100 * r['data_wait_share']:.3f}% of the step "
              f"(mean step {r['step_ms']:.0f} ms; run metrics, first step left out)")
    for rank in sorted(runs["big"]["rss_end"]):
        ratio = runs["big"]["rss_end"][rank] / runs["small"]["rss_end"][rank]
        print(f"  rank {rank}: RSS at the end, {args.pairs:,} vs {args.small_pairs:,} pairs: {ratio:.3f}x")
    per_pair = read_whole_bytes_per_pair(small)
    print(f"reading pairs whole (before streaming): {per_pair / 1024:.1f} KiB per pair, measured on "
          f"{args.small_pairs:,}; {args.pairs:,} pairs -> {per_pair * args.pairs / gib:.1f} GiB on every rank")
    share = bench_data_wait(model, big, work / "bench", args.bench_steps)
    print(f"ear-dist bench over {args.pairs:,} pairs (1 process): data wait {100 * share:.3f}% of the step")
    (work / "results.json").write_text(json.dumps({"runs": runs, "read_whole_bytes_per_pair": per_pair,
                                                   "bench_data_wait_share": share}, indent=1, default=str))
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
