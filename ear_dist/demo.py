"""``ear-dist demo``: the embedded default job of the README, end to end on a CPU.

Build (or reuse) the planted-concept world's tiny model (Janus, or with ``--family var``
the next-scale model on the world's multi-scale bitwise images), erase "church" with the
real ``ear-dist erase`` code path, evaluate on held-out sentences and the synonyms (a Janus
world through ``ear-dist eval``'s world suite), print the before/after table, each method
against the bar (erasure and preservation ratio both >= 0.95) and where the report and images are.
"""

from __future__ import annotations

import time
from pathlib import Path

from ear_dist.config import add_config_args, config_from_args, recipe_overrides
from ear_dist.world.erasure import ABLATIONS, VAR_ABLATIONS, VAR_WORLD_ERASE, WORLD_ERASE


def register(sub) -> None:
    p = sub.add_parser("demo", help="build the toy world, erase 'church', evaluate, report (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output directory for the report")
    p.add_argument("--concept", default="church", help="church, or a style: 'van gogh'")
    p.add_argument("--family", choices=["janus", "var"], default=None,
                   help="the world model's family, i.e. model.family (default janus); var: EAR, S-VARE and the "
                        "preserving method by default")
    p.add_argument("--ablations", default=None,
                   help="comma-separated: EAR, TLM off, window 1, random order, per-sequence updates, cached prefix, "
                        "logit targets, S-VARE, ESD-style naive (var: 'two scales per window' instead of 'window 1', "
                        "no 'cached prefix'), preserving (the project's preserving method: janus, null-space EAR with "
                        "the first layer frozen and the pairs' surrogates among the anchors; var, null-space EAR), "
                        "null-space EAR, later-layer null-space EAR, uncond-anchored preserving (janus); or 'all'. "
                        "Default: EAR,preserving (janus), EAR,S-VARE,preserving (var)")
    p.add_argument("--pairs", type=int, default=None,
                   help="ECG template pairs before the visual filter (default: 16 on the janus world, the preserving "
                        "method's choice on the synonym validation split; 32 on the var world)")
    p.add_argument("--anchors", type=int, default=0,
                   help="preservation anchors: prompts of the other concepts trained as their own surrogates (EAR runs)")
    p.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts per group")
    p.add_argument("--multi", default="", metavar="C1,C2",
                   help="instead: erase several concepts jointly and composed from per-concept deltas, with "
                        "each of --ablations, e.g. --multi 'church,van gogh,barn,windmill'")
    add_config_args(p)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ear_dist.world.erasure import bar_report, markdown_table, run_world_erasure
    from ear_dist.world.pretrain import build_world_model, refuse_missed_target
    from ear_dist.world.var_world import world_for

    t0 = time.perf_counter()
    if args.family:
        args.overrides = list(args.overrides) + [f"model.family={args.family}"]
    cfg = config_from_args(args)
    from ear_dist.paths import directory_path

    directory_path(args.out, "--out")
    family = cfg.model.family
    table, settings = (VAR_ABLATIONS, VAR_WORLD_ERASE) if family == "var" else (ABLATIONS, WORLD_ERASE)
    # --recipe applies to every run, over the world's settings and under --set, as on other commands
    settings = [*settings, *(o for name in args.recipe for o in recipe_overrides(name))]
    chosen = args.ablations or ("EAR,S-VARE,preserving" if family == "var" else "EAR,preserving")
    ablations = list(table) if chosen == "all" else [a.strip() for a in chosen.split(",")]
    for a in ablations:
        if a not in table:
            from ear_dist.errors import InputError

            raise InputError(f"--ablations: {a!r} is not one of {', '.join(table)}")
    if args.pairs is None:
        args.pairs = 32 if family == "var" else 16
    from ear_dist.errors import InputError
    from ear_dist.world.vocabulary import vocabulary_for

    concepts = vocabulary_for(cfg.world).concepts  # checked before a build of minutes
    asked = [c.strip() for c in args.multi.split(",") if c.strip()] if args.multi else [args.concept]
    unknown = [c for c in asked if c not in concepts]
    if unknown:
        raise InputError(f"--{'multi' if args.multi else 'concept'}: {', '.join(map(repr, unknown))} is not a "
                         f"concept of this world ({', '.join(concepts)})")
    print(f"1/3 world model ({family}; built once, then cached)")
    model_path, info = build_world_model(cfg.world, progress=True, family=family)
    refuse_missed_target(info, cfg.world, f"ear-dist demo ({model_path})")
    world = world_for(cfg.world, family)
    if args.multi:
        from ear_dist.world.erasure import run_joint_vs_composed

        concepts = [c.strip() for c in args.multi.split(",") if c.strip()]
        print(f"2/3 erasing {concepts} jointly and as composed per-concept deltas: {', '.join(ablations)}")
        outs = {}
        for name in ablations:
            outs[name] = Path(args.out) / name.replace(" ", "-").lower()
            run_joint_vs_composed(str(model_path), world, outs[name], concepts, args.pairs, args.eval_prompts,
                                  settings + list(args.overrides) + table[name])
        print("3/3 results\n")
        for name, out in outs.items():
            print(f"{name}:\n" + (out / "multi_concept.md").read_text())
        print(f"done in {time.perf_counter() - t0:.0f} s; reports in "
              + ", ".join(f"{out}/multi_concept.md" for out in outs.values()))
        return 0
    print(f"2/3 erasing {args.concept!r}: {', '.join(ablations)}")
    rows = run_world_erasure(str(model_path), world, Path(args.out), concept=args.concept, ablations=ablations,
                             n_pairs=args.pairs, n_eval=args.eval_prompts, overrides=settings + list(args.overrides),
                             n_anchors=args.anchors, table=table)
    print("3/3 results (held-out sentences and synonyms; preservation on the other concepts)\n")
    print(markdown_table(rows))
    print()
    print(bar_report(rows))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; report in {args.out}/results.md, {args.out}/results.json, "
          f"images in {args.out}/before_after.png")
    return 0
