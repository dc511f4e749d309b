"""World pretraining steps/s by ``world.threads``, alone and beside one busy single-threaded process.

Each cell is a fresh process that builds the default world's model and runs the real
pretraining step (``PretrainingStep``) under ``pretraining_threads``, as ``ear-dist world
build`` does: a few warm-up steps, then steps until ``--steps`` or ``--seconds``, whichever
comes first. "Beside one busy process" starts ``python -c 'while True: pass'`` first and
stops it after the cell. Every cell prints a digest of the weights after its steps, so the
table also shows which settings train the same bits (the digest after the warm-up steps).
OpenMP's wait policy is a row of its own: ``OMP_WAIT_POLICY=PASSIVE`` (what importing
ear_dist sets unless the user set one) makes idle threads sleep instead of spinning, without
changing the arithmetic.

    python benchmarks/bench_world_threads.py --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Stat, run_header  # noqa: E402

# (label, world.threads, extra environment)
SETTINGS = [
    ("world.threads=2, OMP_WAIT_POLICY unset (before)", 2, {}),
    ("world.threads=2, OMP_WAIT_POLICY=PASSIVE (now, set by ear_dist)", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("world.threads=1", 1, {}),
]


def worker(threads: int, steps: int, seconds: float, warmup: int) -> dict:
    """Time the real pretraining step on the default world with ``world.threads=threads``."""
    # torch first: OpenMP reads OMP_WAIT_POLICY as torch loads, before ear_dist's default applies,
    # so the cell runs with the wait policy its environment names (unset: OpenMP's own default)
    import torch

    from ear_dist.config import WorldConfig
    from ear_dist.world.pretrain import PretrainingStep, _new_model, pretraining_threads
    from ear_dist.world.world import World

    world = World(WorldConfig(threads=threads))
    with pretraining_threads(world.config):
        bundle = _new_model(world)
        bundle.model.train()
        step = PretrainingStep(world, bundle)
        for s in range(1, warmup + 1):
            step(s)
        weights = _digest(bundle.model)
        done, started = 0, time.perf_counter()
        while done < steps and time.perf_counter() - started < seconds:
            step(warmup + done + 1)
            done += 1
        elapsed = time.perf_counter() - started
        torch_threads = torch.get_num_threads()
    return {"steps": done, "seconds": elapsed, "torch_threads": torch_threads, "weights": weights}


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def run_cell(threads: int, extra_env: dict, busy: bool, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps),
                              "--seconds", str(args.seconds), "--warmup", str(args.warmup)],
                             env=env, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps per cell (at most)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per cell (at most)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps; the weights' digest is taken after them")
    p.add_argument("--repeats", type=int, default=2, help="runs of every cell, interleaved")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seconds, args.warmup)))
        return
    print("\n".join(run_header("world pretraining steps/s by world.threads, alone and beside one busy process")))
    rates: dict[tuple[str, bool], list[float]] = {}
    weights: dict[str, set] = {}
    for _ in range(args.repeats):
        for busy in (False, True):
            for label, threads, extra in SETTINGS:
                cell = run_cell(threads, extra, busy, args)
                rates.setdefault((label, busy), []).append(cell["steps"] / cell["seconds"])
                weights.setdefault(label, set()).add(cell["weights"])
                print(f"# {label}, {'beside a busy process' if busy else 'alone'}: {cell}", flush=True)
    print(f"\nsteps/s, median (min-max) of {args.repeats}; weights: digest after the {args.warmup} warm-up steps\n")
    print("| setting | alone | beside one busy process | slowdown | weights |")
    print("| --- | --- | --- | --- | --- |")
    for label, _, _ in SETTINGS:
        alone, busy = Stat.of(rates[(label, False)]), Stat.of(rates[(label, True)])
        digests = sorted(weights[label])
        print(f"| {label} | {alone.fmt()} | {busy.fmt()} | {alone.median / busy.median:.1f}x | "
              f"{', '.join(digests)} |")


if __name__ == "__main__":
    main()
