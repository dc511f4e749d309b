"""``ear-dist world build``: pretrain (or reuse) the tiny Janus of the synthetic world."""

from __future__ import annotations

from ear_dist.config import add_config_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("world", help="the synthetic world in which erasure quality is measurable on a CPU")
    world_sub = p.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")
    world_sub.required = True
    b = world_sub.add_parser("build", help="pretrain the world's tiny model (model.family: Janus or next-scale) until "
                                           "it draws every concept (cached)")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache holds this config")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(b)
    b.set_defaults(func=run_build)


def run_build(args) -> int:
    from ear_dist.paths import directory_path
    from ear_dist.world.pretrain import build_world_model, cache_root, missed_target_message

    cfg = config_from_args(args)
    directory_path(cache_root(cfg.world), "world.cache_dir" if cfg.world.cache_dir else "the world cache")
    path, info = build_world_model(cfg.world, force=args.force, progress=not args.no_progress,
                                   family=cfg.model.family)
    print(f"world model: {path}")
    print(f"  steps {info['steps']}, {info['seconds'] / 60:.2f} min, {info['torch_threads']} torch threads")
    print("  classifier accuracy on the model's own CFG samples of held-out prompts")
    print(f"    {'concept':24s} {'two sets':>10s} {'third set':>10s}")
    confirm = info.get("confirmation_accuracy", {})
    for concept, acc in info["accuracy"].items():
        second = f"{confirm[concept]:.3f}" if concept in confirm else "-"
        print(f"    {concept:24s} {acc:10.3f} {second:>10s}")
    print(f"  mean {info['mean_accuracy']:.3f} (target {info['target_accuracy']}), every concept >= "
          f"{info['min_accuracy']}: {'reached' if info['reached_target'] else 'MISSED'}")
    if not info["reached_target"]:
        print(f"ear-dist: {missed_target_message(info)}")
        return 1
    return 0

