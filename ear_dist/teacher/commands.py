"""``ear-dist teacher precompute``: teacher rollouts and outputs written once for the offline placement."""

from __future__ import annotations

from ear_dist.config import add_config_args, config_from_args
from ear_dist.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("teacher", help="teacher engine tools")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION")
    tsub.required = True
    pre = tsub.add_parser("precompute", help="write rollouts + outputs of every pair for dist.teacher_placement=offline")
    pre.add_argument("--out", required=True, help="output directory (then run with --set dist.teacher_dir=OUT)")
    pre.add_argument("--batch-size", type=int, default=8)
    pre.add_argument("--overwrite", action="store_true",
                     help="replace --out even if it exists and was not written by `ear-dist teacher precompute` "
                          "(never an input)")
    add_config_args(pre)
    pre.set_defaults(func=run_precompute)


def run_precompute(args) -> int:
    from ear_dist.data.stream import check_prompt_lengths, open_pair_stream
    from ear_dist.models.family import load_model
    from ear_dist.models.fingerprint import model_fingerprint
    from ear_dist.teacher.base import TeacherSettings
    from ear_dist.teacher.colocated import ColocatedTeacher
    from ear_dist.teacher.offline import precompute, run_requests

    from ear_dist.paths import finish_dir, output_dir, removed_on_error, temp_sibling

    cfg = config_from_args(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    out = output_dir(args.out, "teacher precompute", overwrite=args.overwrite,
                     protect=[("model", cfg.model.path), ("pairs", cfg.data.pairs)])
    bundle = load_model(cfg.model.path, cfg.model.family, device=cfg.model.device, dtype=cfg.model.dtype,
                        seed=cfg.model.seed)
    stream, _ = open_pair_stream(cfg, num_image_tokens=bundle.num_image_tokens, codebook_size=bundle.codebook_size)
    if hasattr(stream, "pairs"):  # pairs held in memory: every prompt checked against the context before any work
        check_prompt_lengths(stream.pairs, bundle)
    settings = TeacherSettings.from_config(cfg.erase, cfg.rollout)
    requests = run_requests(stream, cfg.train.steps, settings, args.batch_size, bundle.device)
    tmp = temp_sibling(out)
    with removed_on_error(tmp):
        try:
            index = precompute(ColocatedTeacher(bundle), requests, tmp, settings,
                               {"base_fingerprint": model_fingerprint(bundle.model), "model": cfg.model.path})
        finally:
            stream.close()
    finish_dir(tmp, out, "teacher precompute")
    print(f"precomputed {len(index['pairs'])} pairs ({settings.mode} outputs, rollouts from the "
          f"{settings.rollout_from} prompt) into {len(index['shards'])} shard(s) in {args.out}")
    return 0
