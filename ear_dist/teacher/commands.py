"""``ear-dist teacher precompute``: teacher rollouts and targets written once for the offline placement."""

from __future__ import annotations

from ear_dist.config import add_config_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("teacher", help="teacher engine tools")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION")
    tsub.required = True
    pre = tsub.add_parser("precompute", help="write rollouts + targets of every pair for dist.teacher_placement=offline")
    pre.add_argument("--out", required=True, help="output directory (then run with --set dist.teacher_dir=OUT)")
    pre.add_argument("--batch-size", type=int, default=8)
    add_config_args(pre)
    pre.set_defaults(func=run_precompute)


def run_precompute(args) -> int:
    from ear_dist.models.janus import load_janus, model_fingerprint
    from ear_dist.teacher.dedicated import payload_for
    from ear_dist.teacher.engine import ColocatedTeacher
    from ear_dist.teacher.offline import precompute
    from ear_dist.train.trainer import check_pairs, load_training_pairs

    cfg = config_from_args(args)
    bundle = load_janus(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    pairs = load_training_pairs(cfg)
    check_pairs(pairs, cfg.erase.on_missing_concept, bundle.num_image_tokens)
    r = cfg.rollout
    teacher = ColocatedTeacher(bundle, r.cfg_weight, r.temperature, r.top_k, r.greedy)
    payload = payload_for(cfg, bundle.model, 1)
    index = precompute(teacher, precompute_batches(cfg, pairs, bundle.device, args.batch_size), args.out,
                       payload.mode, payload.with_uncond,
                       {"base_fingerprint": model_fingerprint(bundle.model), "model": cfg.model.path})
    print(f"precomputed {len(index['pairs'])} pairs ({payload.mode} targets) into {len(index['shards'])} shard(s) "
          f"in {args.out}")
    return 0


def precompute_batches(cfg, pairs, device, batch_size: int):
    """Batches covering every (pair, seed) a run with this config can draw.

    A pair with its own seed has one rollout; one without is seeded by its position in
    the run's batch stream, so the run's steps are replayed here to get those seeds.
    """
    from ear_dist.train.trainer import global_batches, to_batch

    seen, items = set(), []
    stream = global_batches(pairs, cfg.train.pairs_per_step, cfg.train.seed, cfg.data.shuffle)
    for step in range(cfg.train.steps):
        batch = to_batch(next(stream), step, cfg.train.pairs_per_step, cfg.erase.rollout_from, device)
        for i in range(len(batch)):
            key = (batch.target_prompts[i], batch.surrogate_prompts[i], batch.seeds[i])
            if key not in seen:
                seen.add(key)
                tok = batch.tokens[i] if batch.tokens is not None else None
                items.append((key, batch.concepts[i], tok))
    from ear_dist.train.step import PairBatch
    import torch

    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        toks = [c[2] for c in chunk]
        tokens = torch.stack(toks) if all(t is not None for t in toks) else None
        yield PairBatch([c[0][0] for c in chunk], [c[0][1] for c in chunk], [c[1] for c in chunk],
                        [c[0][2] for c in chunk], tokens)
