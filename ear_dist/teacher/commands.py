"""``ear-dist teacher precompute``: teacher rollouts and outputs written once for the offline placement."""

from __future__ import annotations

from ear_dist.config import add_config_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("teacher", help="teacher engine tools")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION")
    tsub.required = True
    pre = tsub.add_parser("precompute", help="write rollouts + outputs of every pair for dist.teacher_placement=offline")
    pre.add_argument("--out", required=True, help="output directory (then run with --set dist.teacher_dir=OUT)")
    pre.add_argument("--batch-size", type=int, default=8)
    add_config_args(pre)
    pre.set_defaults(func=run_precompute)


def run_precompute(args) -> int:
    from ear_dist.data.stream import open_pair_stream
    from ear_dist.models.family import load_model
    from ear_dist.models.fingerprint import model_fingerprint
    from ear_dist.teacher.base import TeacherSettings
    from ear_dist.teacher.colocated import ColocatedTeacher
    from ear_dist.teacher.offline import precompute, run_requests

    cfg = config_from_args(args)
    bundle = load_model(cfg.model.path, cfg.model.family, device=cfg.model.device, dtype=cfg.model.dtype,
                        seed=cfg.model.seed)
    stream, _ = open_pair_stream(cfg, num_image_tokens=bundle.num_image_tokens, codebook_size=bundle.codebook_size)
    settings = TeacherSettings.from_config(cfg.erase, cfg.rollout)
    requests = run_requests(stream, cfg.train.steps, settings, args.batch_size, bundle.device)
    try:
        index = precompute(ColocatedTeacher(bundle), requests, args.out, settings,
                           {"base_fingerprint": model_fingerprint(bundle.model), "model": cfg.model.path})
    finally:
        stream.close()
    print(f"precomputed {len(index['pairs'])} pairs ({settings.mode} outputs, rollouts from the "
          f"{settings.rollout_from} prompt) into {len(index['shards'])} shard(s) in {args.out}")
    return 0
