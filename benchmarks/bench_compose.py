"""Composing per-concept deltas on the planted-concept world: sum vs project vs ties.

Erases each concept in its own run (as a Slurm job array does), composes the deltas in memory
by each method (``ear_dist.models.compose``), and judges every concept with the world suites:
per concept the erasure rate (1 - Acc.) and the preservation ratio (mean of the other concepts'
ratios, and the worst one). Writes results.md / results.json under --out.

    flock /tmp/ear-heavy.lock python benchmarks/bench_compose.py --world-cache /work/cache/runner/default_world_model \\
        --out runs/compose                       # the demo's "preserving" per-concept runs
    python benchmarks/bench_compose.py --method EAR --out runs/compose-ear   # the paper's EAR runs

A run directory that already holds the same finished run is reused (train.resume=auto), so
re-running with other --compose methods trains nothing again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from ear_dist.config import load_config
    from ear_dist.world.erasure import ABLATIONS, WORLD_ERASE, run_joint_vs_composed
    from ear_dist.world.pretrain import build_world_model
    from ear_dist.world.world import World

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="church,van gogh,barn,windmill")
    ap.add_argument("--method", default="preserving", help=f"the per-concept runs' method, of: {', '.join(ABLATIONS)}")
    ap.add_argument("--compose", default="sum,project,ties", help="composition methods (columns)")
    ap.add_argument("--energy", type=float, default=0.999, help="project: input energy share projected off")
    ap.add_argument("--joint", action="store_true", help="also train the joint run (as many steps as all together)")
    ap.add_argument("--pairs", type=int, default=16, help="ECG pairs per concept before the visual filter")
    ap.add_argument("--eval-prompts", type=int, default=48, help="prompts per evaluated group")
    ap.add_argument("--world-cache", default=None, help="world.cache_dir (a prebuilt world is reused)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="config overrides of every run")
    ap.add_argument("--out", default="runs/compose")
    args = ap.parse_args()

    wsets = [f"world.cache_dir={args.world_cache}"] if args.world_cache else []
    wcfg = load_config(overrides=wsets).world
    path, _ = build_world_model(wcfg, progress=True)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    methods = [m.strip() for m in args.compose.split(",") if m.strip()]
    overrides = [*WORLD_ERASE, *ABLATIONS[args.method], "train.resume=auto", *args.overrides]
    t0 = time.perf_counter()
    table = run_joint_vs_composed(str(path), World(wcfg), Path(args.out), concepts, args.pairs, args.eval_prompts,
                                  overrides, compose=methods, joint=args.joint, energy=args.energy)
    seconds = time.perf_counter() - t0
    lines = ["| composition | concept | erasure rate (1 - Acc.) | preservation ratio (mean) | worst concept |",
             "|---|---|---|---|---|"]
    for column, row in table.items():
        if column == "before":
            continue
        for c, v in row.items():
            mean = "-" if v["preservation_ratio"] is None else f"{v['preservation_ratio']:.3f}"
            worst = "-" if v["worst_ratio"] is None else f"{v['worst_concept']} {v['worst_ratio']:.3f}"
            lines.append(f"| {column} | {c} | {v['erasure_rate']:.3f} | {mean} | {worst} |")
        rates = [v["erasure_rate"] for v in row.values()]
        worsts = [v["worst_ratio"] for v in row.values() if v["worst_ratio"] is not None]
        lines.append(f"| {column} | all: mean (min) | {sum(rates) / len(rates):.3f} ({min(rates):.3f}) | - | "
                     f"{min(worsts):.3f} |" if worsts else f"| {column} | all | - | - | - |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    head = (f"- Command: `python benchmarks/bench_compose.py {' '.join(sys.argv[1:])}` ({seconds:.0f} s)\n"
            f"- Machine: {platform.node()} ({platform.processor() or platform.machine()}), date "
            f"{datetime.date.today()}, commit {commit.strip()}\n")
    out = Path(args.out)
    (out / "results.md").write_text(head + "\n" + "\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, "results": table},
                                                 indent=2))
    print(head + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
