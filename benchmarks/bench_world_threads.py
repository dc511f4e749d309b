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
    python benchmarks/bench_world_threads.py --world-recipe world-large --batch-sizes 32,64 --alone --repeats 3

``--world-recipe`` times another world's model (the large preset: its 2048-code head and 250
words); ``--batch-sizes`` adds a column per pretraining batch size and samples/s beside steps/s,
which is what decides whether a build of a given number of samples fits a time budget.
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


def worker(threads: int, steps: int, seconds: float, warmup: int, recipes: list[str], batch: int) -> dict:
    """Time the real pretraining step on the world of ``recipes`` (none: the default world) with
    ``world.threads=threads`` and ``world.batch_size=batch`` (0: the recipe's)."""
    # torch first: OpenMP reads OMP_WAIT_POLICY as torch loads, before ear_dist's default applies,
    # so the cell runs with the wait policy its environment names (unset: OpenMP's own default)
    import torch

    from ear_dist.config import load_config
    from ear_dist.world.pretrain import PretrainingStep, _new_model, pretraining_threads
    from ear_dist.world.world import World

    sets = [f"world.threads={threads}"] + ([f"world.batch_size={batch}"] if batch else [])
    world = World(load_config(overrides=sets, recipes=recipes).world)
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
    return {"steps": done, "seconds": elapsed, "torch_threads": torch_threads, "weights": weights,
            "batch": world.config.batch_size}


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def run_cell(threads: int, extra_env: dict, busy: bool, args, batch: int = 0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps),
                              "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--batch", str(batch),
                              *[x for r in args.world_recipe for x in ("--world-recipe", r)]],
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
    p.add_argument("--world-recipe", action="append", default=[], metavar="NAME",
                   help="time this world recipe's model (e.g. world-large); default: the default world")
    p.add_argument("--batch-sizes", default="", metavar="B1,B2",
                   help="pretraining batch sizes to time (a column each, with samples/s); default: the world's")
    p.add_argument("--alone", action="store_true", help="only the cells without a busy process beside them")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seconds, args.warmup, args.world_recipe, args.batch)))
        return
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if batches:
        return by_batch(args, batches)
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



def by_batch(args, batches: list[int]) -> None:
    """Steps/s and samples/s per (threads, batch size), every cell a fresh process, repeats interleaved."""
    world = ", ".join(args.world_recipe) or "the default world"
    print("\n".join(run_header(f"world pretraining throughput by world.threads and batch size ({world})")))
    settings = [(label, threads, extra) for label, threads, extra in SETTINGS if extra or threads == 1]
    busy_modes = (False,) if args.alone else (False, True)
    rates: dict[tuple, list[float]] = {}
    for _ in range(args.repeats):
        for busy in busy_modes:
            for label, threads, extra in settings:
                for batch in batches:
                    cell = run_cell(threads, extra, busy, args, batch)
                    rates.setdefault((label, batch, busy), []).append(cell["steps"] / cell["seconds"])
                    print(f"# {label}, batch {batch}, {'beside a busy process' if busy else 'alone'}: {cell}",
                          flush=True)
    print(f"\nsteps/s and samples/s (steps/s x batch), median (min-max) of {args.repeats}\n")
    print("| setting | batch | " + " | ".join(f"{m}: steps/s | {m}: samples/s" for m in
                                             ("alone", "beside one busy process")[:len(busy_modes)]) + " |")
    print("| --- | --- |" + " --- | --- |" * len(busy_modes))
    for label, _, _ in settings:
        for batch in batches:
            cells = []
            for busy in busy_modes:
                steps = Stat.of(rates[(label, batch, busy)])
                samples = Stat.of([r * batch for r in rates[(label, batch, busy)]])
                cells += [steps.fmt(), samples.fmt()]
            print(f"| {label} | {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
