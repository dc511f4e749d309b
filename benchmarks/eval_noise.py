"""The judge's own noise: the preservation ratios a model gets when nothing about it changed.

A comparison (``bench_preservation.py``) judges a model by its hit rate on ``--eval-prompts``
prompts per concept group, sampled with fixed seeds, against the base's hit rate on the same
prompts and seeds. An erasure run changes the model's logits a little almost everywhere, so
its samples of an untouched concept are no longer the base's samples: even a perfectly
preserving run is then judged on fresh draws. This script measures what that alone costs:
the base model judged against itself with other sampling seeds (``hit_rates(draw=k)``), the
same prompts, as preservation ratios (draw k / draw 0) over the concepts that stay when
``--erased`` is erased: their mean and their worst, for each draw.

    python benchmarks/eval_noise.py --split heldout --world-seeds 0,1 --draws 4 --eval-prompts 48,192

The figures are in the README ("How much of the worst concept is the judge's noise").
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from ear_dist.models.family import load_model
    from benchmarks.harness.compare import (SPLITS, add_world_arguments, check_world_arguments, hit_rates, outcome,
                                            world_config)
    from ear_dist.world.pretrain import build_world_model, refuse_missed_target
    from ear_dist.world.var_world import world_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="heldout", choices=list(SPLITS))
    ap.add_argument("--world-seeds", default="0")
    ap.add_argument("--draws", type=int, default=4, help="sampling-seed sets judged against draw 0")
    ap.add_argument("--eval-prompts", default="48", help="comma-separated prompts per group")
    ap.add_argument("--erased", default="church", help="comma-separated: the concepts whose groups are left out")
    add_world_arguments(ap)
    ap.add_argument("--out", default="runs/eval_noise.json")
    args = ap.parse_args()
    check_world_arguments(ap, args)

    erased = [c.strip() for c in args.erased.split(",") if c.strip()]
    t0 = time.perf_counter()
    rows = []
    for ws in [int(s) for s in args.world_seeds.split(",")]:
        wcfg = world_config(args, ws)
        path, info = build_world_model(wcfg, progress=True)
        refuse_missed_target(info, wcfg, f"world seed {ws} ({path})")  # measured only with world.allow_missed_target
        world = world_for(wcfg, "janus")
        base = load_model(str(path), "janus", device="cpu", dtype="float32")
        for n in [int(s) for s in args.eval_prompts.split(",")]:
            draws = [hit_rates(world, base, args.split, n, wcfg.guidance_weight, draw=k) for k in range(args.draws + 1)]
            for k in range(1, args.draws + 1):
                res = outcome(draws[0], draws[k], erased, vocab=world.vocab)
                name, worst = res.preservation_worst
                rows.append({"world_seed": ws, "eval_prompts": n, "draw": k, "mean": res.preservation_mean,
                             "worst": worst, "worst_group": name,
                             "excluded": list(res.excluded),
                             "at_bar": res.preservation_mean is not None and res.preservation_mean >= 0.95
                             and worst >= 0.95})
                print(f"world seed {ws} | {n} prompts | draw {k}: mean {res.preservation_mean:.3f}, "
                      f"worst {worst:.3f} ({name})", flush=True)
    lines = ["| prompts per group | draws | preservation ratio, mean: mean (min-max) | worst: mean (min-max) "
             "| draws with mean and worst >= 0.95 |", "|---|---|---|---|---|"]
    for n in sorted({r["eval_prompts"] for r in rows}):
        sel = [r for r in rows if r["eval_prompts"] == n]
        m, w = [r["mean"] for r in sel], [r["worst"] for r in sel]
        lines.append(f"| {n} | {len(sel)} | {statistics.mean(m):.3f} ({min(m):.3f}-{max(m):.3f}) | "
                     f"{statistics.mean(w):.3f} ({min(w):.3f}-{max(w):.3f}) | {sum(r['at_bar'] for r in sel)} of "
                     f"{len(sel)} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                               "machine": platform.node(), "seconds": round(time.perf_counter() - t0),
                               "rows": rows, "table": table}, indent=1))
    print(table)
    print(f"{round(time.perf_counter() - t0)} s; {out}")


if __name__ == "__main__":
    main()
