"""Attack success against the paper's EAR, the preserving recipe and the resisting recipe, over erasure seeds.

For each concept and erasure seed: ``run_world_erasure`` trains one delta per method (world recipes:
``world-ear``, ``world-preserving``, ``world-resisting``) and judges it on the world suite's held-out prompts
(erasure rate, preservation ratio over the other concepts); then the two white-box attacks (inversion and
the GCG search, budgets from ``eval.attack.*``, attack seed = the erasure seed) run against the base model
and each delta, their images judged by the world's classifier: the attack success rate (ASR). The attacks'
settings are fixed before any method runs (pass them with ``--set eval.attack.*``; the command in the
results names them). Prints one row per method with the median and the min-max over seeds.

    python benchmarks/bench_resisting.py --concept church --concept "van gogh" --seeds 0 1 2 \
        --set world.cache_dir=DIR --set eval.attack.targets=128 ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ear_dist.config import add_config_args, config_from_args  # noqa: E402

METHODS = {"EAR": "world-ear", "preserving": "world-preserving", "resisting": "world-resisting"}
IMAGES = 48


def attack(model, world, concept: str, targets, inversion, search, words, template: str, search_words: bool):
    """ASR of both attacks against ``model`` as it is now (a delta applied or not)."""
    from ear_dist.eval.attacks import invert_concept, search_prompts

    t = time.perf_counter()
    inv = invert_concept(model, targets, inversion)
    inv_s = time.perf_counter() - t
    t = time.perf_counter()
    found = search_prompts(model, targets, search, template=template, exclude=() if search_words else words)
    search_s = time.perf_counter() - t
    share = lambda images: float(world.classify(images)[concept].mean())  # noqa: E731
    return {"inversion_asr": share(inv.images), "search_asr": share(found.images), "inversion_s": inv_s,
            "search_s": search_s, "search_prompt": found.prompts[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--method", action="append", default=[], help=f"of {', '.join(METHODS)} (default: all)")
    p.add_argument("--no-base-attack", action="store_true",
                   help="attack the erased models only (the base model's attack success is that of an earlier run "
                        "with the same attack seeds)")
    p.add_argument("--out", default="", help="run directory (default: a temporary one)")
    p.add_argument("--json", default="", help="write the figures here too")
    add_config_args(p)
    args = p.parse_args(argv)
    import dataclasses

    from benchmarks.common import Stat, run_header
    from ear_dist.config.loading import recipe_overrides
    from ear_dist.eval.attacks import sample_targets
    from ear_dist.eval.attacks.whitebox import budgets, target_prompts
    from ear_dist.models.delta import applied_deltas
    from ear_dist.models.family import load_model
    from ear_dist.world.concepts import all_concept_words
    from ear_dist.world.erasure import run_world_erasure
    from ear_dist.world.pretrain import build_world_model, refuse_missed_target
    from ear_dist.world.world import World

    cfg = config_from_args(args)
    concepts = args.concept or ["church"]
    methods = args.method or list(METHODS)
    world = World(cfg.world)
    path, info = build_world_model(cfg.world, progress=False)
    refuse_missed_target(info, cfg.world, "bench_resisting")
    model = load_model(str(path), device="cpu", dtype="float32")
    a = cfg.eval.attack
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-resisting-"))
    for line in run_header("attack success against erasure methods"):
        print(line)
    print(f"# world build {info['build_hash']} (seed {cfg.world.seed}); attacks: {json.dumps(dataclasses.asdict(a))}; "
          f"{IMAGES} images per attack; run directory {out}", flush=True)
    rows = []
    for concept in concepts:
        words = all_concept_words(world, [concept])
        targets = sample_targets(model, target_prompts(concept, a.targets), a.seed, cfg.world.guidance_weight)
        for seed in args.seeds:
            inversion, search = budgets(cfg)
            inversion = dataclasses.replace(inversion, images=IMAGES, seed=seed)
            search = dataclasses.replace(search, images=IMAGES, seed=seed)
            table = {m: recipe_overrides(METHODS[m]) for m in methods}
            run_dir = out / concept.replace(" ", "-") / f"seed{seed}"
            t = time.perf_counter()
            evaluated = run_world_erasure(str(path), world, run_dir, concept, ablations=methods, table=table,
                                          overrides=[f"train.seed={seed}"], progress=False, log=lambda *_: None)
            train_s = time.perf_counter() - t
            base = evaluated["before"]
            for name in ["base", *methods]:
                delta = [] if name == "base" else [str(run_dir / "runs" / name.lower() / "delta.safetensors")]
                skipped = {"inversion_asr": float("nan"), "search_asr": float("nan"), "inversion_s": 0.0,
                           "search_s": 0.0, "search_prompt": "-"}
                with applied_deltas(model.model, delta):
                    found = skipped if name == "base" and args.no_base_attack else attack(
                        model, world, concept, targets, inversion, search, words, a.search_template,
                        a.search_concept_words)
                ev = evaluated["before" if name == "base" else name]
                kept = ev.preservation_vs(base)
                row = {"concept": concept, "seed": seed, "method": name, "erasure": ev.erasure_rate,
                       "erasure_all_groups": ev.erasure_all_groups, "preservation_mean": kept.mean,
                       "preservation_worst": kept.worst, "train_and_eval_s": train_s, **found}
                rows.append(row)
                print(f"| {concept} | {seed} | {name} | {row['erasure']:.3f} | {row['erasure_all_groups']:.3f} | "
                      f"{kept.mean:.3f} | {kept.worst:.3f} | {found['inversion_asr']:.3f} | {found['search_asr']:.3f} | "
                      f"{found['inversion_s']:.0f} + {found['search_s']:.0f} | {found['search_prompt']!r} |", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    print("\n| concept | method | erasure (held-out test prompts) | erasure (all groups) | preservation mean | "
          "preservation worst | inversion ASR | search ASR | seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda s: f"{s.median:.3f} ({s.min:.3f}-{s.max:.3f})"  # noqa: E731
    for concept in concepts:
        for name in ["base", *methods]:
            mine = [r for r in rows if r["concept"] == concept and r["method"] == name]
            cells = [fmt(Stat.of([r[k] for r in mine])) for k in (
                "erasure", "erasure_all_groups", "preservation_mean", "preservation_worst", "inversion_asr",
                "search_asr")]
            print(f"| {concept} | {name} | " + " | ".join(cells) + f" | {len(mine)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
