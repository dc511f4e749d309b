"""Erasure vs preservation on the planted-concept world, over world builds and erasure seeds.

Runs each method (config overrides on top of the world's erasure settings) on "church"
and "van gogh" alone, on four concepts jointly and as composed per-concept deltas, for
every erasure seed on every world build, and writes results.json / results.md: erasure
(the least-erased group of the erased concepts), preservation ratio (the mean of the
per-concept ratios over every other object and style, and the worst one, named; a concept
whose base hit rate is 0 is excluded and listed), as mean (min-max) over builds and seeds,
with the base models' own hit rates. Every figure is ``ear_dist/eval/figures.py``'s, the
definitions ``ear-dist eval`` reports (docs/metrics.md).

    python benchmarks/bench_preservation.py --split heldout --world-seeds 0,1 --seeds 0,1,2 --out runs/preservation
    python benchmarks/bench_preservation.py --split validation --world-seeds 0 --seeds 0 --methods "EAR (paper)" \\
        --set optim.lr=1e-4 --out runs/explore        # choosing settings: the validation split only
    python benchmarks/bench_preservation.py --family var --methods "EAR (paper),S-VARE" --out runs/var
                                                      # the VAR world, its erasure settings (recipe world-var-ear)
    python benchmarks/bench_preservation.py --methods "EAR (paper)" --recipe preserving --out runs/recipes
                                                      # a packaged recipe (ear-dist config list) as a method

Each world build is made once and cached (``ear-dist world build``, ~5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.compare import SPLITS  # noqa: E402
from ear_dist.world.erasure import ABLATIONS, UNCOND_ANCHORED_PRESERVING, VAR_ABLATIONS  # noqa: E402

# The preserving method's parts, each a config lever (README: "Erasure that keeps everything else").
UNCOND_ANCHORED = ["erase.reference_prompt=unconditional", "erase.rollout_from=target", "erase.target_mode=logit"]
METHODS = {
    "EAR (paper)": ([], 0),
    "uncond-anchored": (UNCOND_ANCHORED, 0),
    "uncond-anchored + preservation": (UNCOND_ANCHORED + ["preserve.weight=1.0"], 64),
    "uncond-anchored + preservation + null space": (UNCOND_ANCHORED + ["preserve.weight=1.0",
                                                                       "preserve.nullspace=true"], 64),
    "EAR + null space": (["preserve.nullspace=true"], 64),
    # the first preserving method, its settings chosen on the validation split (README)
    "preserving (uncond-anchored + preservation + null space; eta 3; 100 steps)": (UNCOND_ANCHORED_PRESERVING, 64),
    # S-VARE; on the VAR world with the paper's trained modules and the world's one-bit unsafe share (README)
    "S-VARE": (ABLATIONS["S-VARE"], 0),
    # the paper's EAR with every layer's linear updates projected off the anchors' inputs, plus their KL (README)
    "null-space EAR": (ABLATIONS["null-space EAR"], 64),
    # the same with the first layer frozen, so the update reaches the synonyms (README: "Synonyms: the first layer
    # frozen")
    "later-layer null-space EAR": (ABLATIONS["later-layer null-space EAR"], 64),
    # the project's preserving method (the demo's "preserving"): the same with the training pairs' surrogates among
    # the anchors (README: "Surrogate anchors")
    "surrogate-anchored null-space EAR": (ABLATIONS["preserving"], 64),
    # the paper's ablations, to check its claims across builds and seeds (README)
    **{name: (ABLATIONS[name], 0) for name in ("TLM off", "window 1", "random order")},
}
VAR_METHODS = {"S-VARE": VAR_ABLATIONS["S-VARE"], "null-space EAR": VAR_ABLATIONS["preserving"]}


def build_methods(names, family: str, overrides=(), anchors=None) -> list:
    """The named methods with their settings for ``family``; ``overrides`` (``--set``) come last, so they win
    over a method's own settings as well as the world's."""
    from benchmarks.harness.compare import Method

    family_overrides = VAR_METHODS if family == "var" else {}
    return [Method(n, [*family_overrides.get(n, METHODS[n][0]), *overrides],
                   anchors if anchors is not None and METHODS[n][1] else METHODS[n][1]) for n in names]


def recipe_method(name: str, overrides=(), anchors=None):
    """A packaged recipe as a method named ``recipe NAME``; one that preserves (KL or null space) gets anchors."""
    from ear_dist.config import read_recipe, recipe_overrides
    from benchmarks.harness.compare import Method

    preserve = read_recipe(name).get("preserve", {})
    preserves = bool(preserve.get("nullspace")) or float(preserve.get("weight", 0)) > 0
    return Method(f"recipe {name}", [*recipe_overrides(name), *overrides],
                  (64 if anchors is None else anchors) if preserves else 0)


def draw_concepts(concepts, n: int, world_seed: int, seed: int) -> list[str]:
    """``n`` of the world's concepts (objects and styles mixed) drawn at random, fixed by the world and erasure seed."""
    import numpy as np

    if not 1 <= n <= len(concepts):
        raise SystemExit(f"--draw {n}: the world has {len(concepts)} concepts")
    rng = np.random.default_rng([world_seed, seed, n, 0x5CA1E])
    return [concepts[i] for i in sorted(rng.choice(len(concepts), size=n, replace=False))]


def scaling_table(runs: list[dict], info: dict) -> str:
    """Per method, N and route: erasure (worst erased group), preservation (mean, worst), optimizer steps, training
    wall time and seconds per concept, each as mean (min-max) over world builds and erasure seeds."""
    from ear_dist.eval import figures

    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    def seconds(values):
        return f"{sum(values) / len(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    groups: dict = {}
    for r in runs:
        route = "alone" if r["n"] == 1 else r["setting"].split(":")[0]
        groups.setdefault((r["method"], r["n"], route), []).append(r)
    lines = ["| method | concepts | route | runs | erasure, worst erased group | preservation ratio (mean) | "
             "worst kept concept | bar met | steps | training s | s per concept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, n, route), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        # each run's figures as the comparison's summary takes them (figures.erasure / figures.preservation)
        gone = [figures.erasure({g: 1.0 - e for g, e in r["erasure"].items()}) for r in rs]
        kept = [figures.preservation({g: 1.0 for g in r["preservation"]}, r["preservation"]) for r in rs]
        met = sum(figures.meets_bar(e, k, worst_bar=figures.MANY_WORST_BAR) for e, k in zip(gone, kept))
        train = [r["train"] for r in rs if r.get("train")]
        lines.append(f"| {method} | {n} | {route} | {len(rs)} | {spread([e.worst for e in gone])} | "
                     f"{spread([k.mean for k in kept])} | {spread([k.worst for k in kept])} | "
                     f"{met} of {len(rs)} | {seconds([t['steps'] for t in train]) if train else '-'} | "
                     f"{seconds([t['seconds'] for t in train]) if train else '-'} | "
                     f"{seconds([t['seconds'] / n for t in train]) if train else '-'} |")
    head = (f"Command: `{info['command']}`; machine {info['machine']} ({info['cpus']} CPUs); date {info['date']}; "
            f"split {info['split']}; pairs {info.get('multi_pairs', 'avoid')}. The bar: every erased group >= "
            f"{figures.BAR}, the kept concepts' mean ratio >= {figures.BAR} and the worst >= {figures.MANY_WORST_BAR}.")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    from benchmarks.harness.compare import (ROUTES, add_world_arguments, check_world_arguments, compare, world_config,
                                            write)
    from ear_dist.world.erasure import VAR_WORLD_ERASE, WORLD_ERASE
    from ear_dist.world.pretrain import build_world_model, refuse_missed_target
    from ear_dist.world.var_world import world_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--split", default="validation", choices=list(SPLITS))
    ap.add_argument("--family", default="janus", choices=["janus", "var"], help="the model family and its world")
    ap.add_argument("--world-seeds", default="0")
    ap.add_argument("--seeds", default="0", help="erasure seeds (train.seed)")
    ap.add_argument("--concepts", default="church,van gogh", help="concepts erased alone")
    ap.add_argument("--multi", default="church,van gogh,barn,windmill", help="concepts erased jointly and composed")
    ap.add_argument("--pairs", type=int, default=32, help="ECG template pairs per concept before the visual filter")
    ap.add_argument("--eval-prompts", type=int, default=48, help="prompts per evaluated group")
    ap.add_argument("--anchors", type=int, default=None, help="anchor prompts for methods that use them")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME",
                    help="a packaged recipe (ear-dist config list) as one more method, over the world's erasure "
                         "settings (repeatable)")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="an override for every method, applied after the method's own settings")
    ap.add_argument("--draw", default="", metavar="N1,N2",
                    help="the scaling table: for every erasure seed and each N, N concepts drawn at random from the "
                         "world's objects and styles, erased jointly and composed (N = 1: alone); replaces "
                         "--concepts/--multi")
    ap.add_argument("--multi-pairs", default="avoid", choices=["avoid", "plain"],
                    help="avoid: the joint run's and array tasks' pairs show none of the job's other concepts "
                         "(ear-dist erase-many); plain: every run the single-concept pairs (earlier tables)")
    ap.add_argument("--routes", default="joint,composed",  # the harness's ROUTES
                    help="for the concepts of --multi (or each --draw N > 1): joint (one run), composed (a job "
                         "array's per-concept deltas, merged), or both")
    add_world_arguments(ap)
    ap.add_argument("--noise-draws", type=int, default=1,
                    help="with --draw: the unchanged base judged again with this many other sets of sampling seeds "
                         "(the judge's noise floor at the same evaluation size, printed beside the scaling table)")
    ap.add_argument("--out", default="runs/preservation")
    args = ap.parse_args()
    if args.split == "heldout" and args.overrides:
        ap.error("--set with --split heldout: settings are chosen on the validation split; the held-out split "
                 "measures methods and recipes as they are (--methods, --recipe)")

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    methods = build_methods(names, args.family, args.overrides, args.anchors)
    methods += [recipe_method(r, args.overrides, args.anchors) for r in args.recipe]
    check_world_arguments(ap, args)
    singles = [c.strip() for c in args.concepts.split(",") if c.strip()]
    multi = [c.strip() for c in args.multi.split(",") if c.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or any(r not in ROUTES for r in routes):
        ap.error(f"--routes {args.routes!r}: joint, composed or joint,composed")
    out = Path(args.out)
    t0 = time.perf_counter()
    by_world, builds = {}, {}
    erase_settings = VAR_WORLD_ERASE if args.family == "var" else WORLD_ERASE
    draws = [int(n) for n in args.draw.split(",") if n.strip()]
    scaling: list[dict] = []
    noise: dict[int, list[dict]] = {}
    for ws in [int(s) for s in args.world_seeds.split(",")]:
        wcfg = world_config(args, ws)
        path, info = build_world_model(wcfg, progress=True, family=args.family)
        builds[ws] = {"path": str(path), "steps": info["steps"], "reached_target": info["reached_target"]}
        refuse_missed_target(info, wcfg, f"world seed {ws} ({path})")  # measured only with world.allow_missed_target
        world = world_for(wcfg, args.family)
        if not draws:
            by_world[ws] = compare(str(path), world, methods, out / f"world{ws}", singles, multi, seeds, args.split,
                                   args.pairs, args.eval_prompts, base_overrides=erase_settings,
                                   avoid_erased=args.multi_pairs == "avoid", routes=routes)
            continue
        by_world[ws] = {"base": None, "runs": []}
        for seed in seeds:
            for n in draws:
                drawn = draw_concepts(world.vocab.concepts, n, ws, seed)
                res = compare(str(path), world, methods, out / f"world{ws}" / f"seed{seed}-n{n}",
                              drawn if n == 1 else [], drawn if n > 1 else [], [seed], args.split, args.pairs,
                              args.eval_prompts, base_overrides=erase_settings,
                              avoid_erased=args.multi_pairs == "avoid", base_hits=by_world[ws]["base"],
                              routes=routes)
                by_world[ws]["base"] = res["base"]
                by_world[ws]["runs"] += res["runs"]
                scaling += [dict(r, world_seed=ws, n=n) for r in res["runs"]]
        if args.noise_draws > 0:
            from benchmarks.harness.compare import judge_noise
            from ear_dist.models.family import load_model

            noise[ws] = judge_noise(world, load_model(str(path), args.family, device="cpu", dtype="float32"),
                                    args.split, args.eval_prompts, world.config.guidance_weight,
                                    by_world[ws]["base"], args.noise_draws)
    info = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(), "machine": platform.node(),
            "cpus": __import__("os").cpu_count(), "seconds": round(time.perf_counter() - t0), "builds": builds,
            "split": args.split, "family": args.family, "world_overrides": args.world_overrides,
            "methods": {m.name: m.overrides for m in methods}, "overrides": args.overrides,
            "multi_pairs": args.multi_pairs, "routes": routes, "world_recipes": args.world_recipe, "noise_floor": noise}
    payload = write(out, by_world, info)
    if draws:
        info["draws"] = draws
        floor = "".join(f"\n\nThe judge's noise floor, world seed {ws} (the unchanged base judged again with other "
                        f"sampling seeds, the same prompts, {args.eval_prompts} per group, every group): " +
                        "; ".join(f"draw {r['draw']}: mean {r['mean']:.3f}, worst {r['worst']:.3f} "
                                  f"({r['worst_group']})" for r in rows) + "."
                        for ws, rows in noise.items() if rows and rows[0]["mean"] is not None)
        (out / "scaling.md").write_text(scaling_table(scaling, info) + floor + "\n")
        print((out / "scaling.md").read_text())
    print((out / "results.md").read_text())
    print(f"{len(payload['runs'])} evaluations in {info['seconds']} s; {out / 'results.json'}")


if __name__ == "__main__":
    main()
