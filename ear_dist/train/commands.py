"""``ear-dist erase`` and ``ear-dist merge``."""

from __future__ import annotations

import json

from ear_dist.config import add_config_args, config_from_args


def register(sub) -> None:
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
    m.add_argument("--conflicts", choices=["warn", "error", "sum"], default="warn",
                   help="two deltas whose changes to shared tensors point in opposite directions (cosine < 0): "
                        "warn (default), error (refuse to merge), sum (compose silently)")
    m.set_defaults(func=run_merge_cmd)


def run_erase_cmd(args) -> int:
    """Train; on SIGUSR1/SIGTERM (Slurm preemption) checkpoint at the next step and exit 75 to be requeued."""
    from ear_dist.slurm.preempt import PreemptionHandler
    from ear_dist.train.trainer import run_erase

    cfg = config_from_args(args)
    with PreemptionHandler() as handler:
        summary = run_erase(cfg, progress=not args.no_progress, should_stop=lambda: handler.requested)
    if summary.get("role") != "teacher" and summary.get("delta") or summary.get("stopped"):
        print(json.dumps(summary, indent=2))  # the main student rank alone has a delta path
    return handler.exit_code if summary.get("stopped") else 0


def run_merge_cmd(args) -> int:
    from ear_dist.models.janus import load_janus, save_janus
    from ear_dist.train.delta import apply_deltas

    bundle = load_janus(args.base, device="cpu", dtype="float32")
    if len(args.delta) > 1 and args.conflicts != "sum":
        from ear_dist.slurm.array import compare_changes

        base_state = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
        for pair in compare_changes(base_state, args.delta):
            if pair.shared_tensors and pair.cosine < 0:
                msg = (f"{pair.first} and {pair.second} change {pair.shared_tensors} shared tensors in opposite "
                       f"directions (cosine {pair.cosine:.3f}); their sum erases each concept less than alone")
                if args.conflicts == "error":
                    raise ValueError(msg + " (use --conflicts warn or sum to merge anyway)")
                print(f"warning: {msg}")
    report = apply_deltas(bundle.model, args.delta, args.weight, check_base=not args.no_base_check)
    for name, owners in report["overlaps"].items():
        print(f"note: {name} is changed by {len(owners)} deltas; their changes are summed")
    save_janus(bundle, args.out)
    print(f"merged {len(args.delta)} delta(s) ({report['tensors']} tensors, concepts {report['concepts']}) "
          f"into {args.out}")
    return 0
