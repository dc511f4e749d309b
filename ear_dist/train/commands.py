"""``ear-dist erase`` and ``ear-dist merge``."""

from __future__ import annotations

import json


def register(sub) -> None:
    from ear_dist.cli import add_config_args

    p = sub.add_parser("erase", help="fine-tune a student to erase a concept; writes a delta")
    add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=run_erase_cmd)

    m = sub.add_parser("merge", help="apply one or more deltas to a base model and save a full model")
    m.add_argument("--base", required=True, help="base model directory (or preset) the deltas were trained from")
    m.add_argument("--delta", action="append", required=True, help="delta file (repeatable)")
    m.add_argument("--weight", action="append", type=float, default=None,
                   help="weight per delta (repeatable, same order; default 1.0 each)")
    m.add_argument("--out", required=True, help="output directory (loads with from_pretrained)")
    m.add_argument("--no-base-check", action="store_true", help="skip the base-model fingerprint check")
    m.set_defaults(func=run_merge_cmd)


def run_erase_cmd(args) -> int:
    from ear_dist.cli import config_from_args
    from ear_dist.train.trainer import run_erase

    cfg = config_from_args(args)
    summary = run_erase(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def run_merge_cmd(args) -> int:
    from ear_dist.models.janus import load_janus, save_janus
    from ear_dist.train.delta import apply_deltas

    bundle = load_janus(args.base, device="cpu", dtype="float32")
    report = apply_deltas(bundle.model, args.delta, args.weight, check_base=not args.no_base_check)
    for name, owners in report["overlaps"].items():
        print(f"note: {name} is changed by {len(owners)} deltas; their changes are summed")
    save_janus(bundle, args.out)
    print(f"merged {len(args.delta)} delta(s) ({report['tensors']} tensors, concepts {report['concepts']}) "
          f"into {args.out}")
    return 0
