"""``ear-dist erase``."""

from __future__ import annotations

import json
import signal
import sys

from ear_dist.config import add_config_args, config_from_args


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def register(sub) -> None:
    p = sub.add_parser("erase", help="fine-tune a student to erase a concept; writes a delta")
    add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=run_erase_cmd)


def run_erase_cmd(args) -> int:
    """Train. SIGUSR1/SIGTERM (Slurm preemption) and SIGINT (Ctrl-C) stop the run at the end of the step:
    a checkpoint, one line on stderr, exit 75 (130 for SIGINT); a second signal stops it at once."""
    from ear_dist.slurm.preempt import PreemptionHandler
    from ear_dist.train.trainer import run_erase

    cfg = config_from_args(args)
    check_out_dir(cfg)
    with PreemptionHandler(STOP_SIGNALS, abort_on_repeat=True) as handler:
        summary = run_erase(cfg, progress=not args.no_progress, should_stop=lambda: handler.requested)
    if summary.get("role") != "teacher" and summary.get("delta") or summary.get("stopped"):
        print(json.dumps(summary, indent=2))  # the main student rank alone has a delta path
    if not summary.get("stopped"):
        return 0
    print(f"ear-dist: stopped by {handler.signal_name} after step {summary['step']}, checkpoint "
          f"{summary['checkpoint']}: run the same command to resume", file=sys.stderr, flush=True)
    return handler.exit_code


def check_out_dir(cfg) -> None:
    """``train.out_dir`` before any work: a directory path (not empty, not a file or under one) that is not,
    does not hold, and does not sit inside the model, the pairs or the teacher directory (``ear_dist.paths``)."""
    from ear_dist.paths import check_not_an_input, directory_path

    out = directory_path(cfg.train.out_dir, "train.out_dir")
    check_not_an_input(out, [("model.path", cfg.model.path), ("data.pairs", cfg.data.pairs),
                             ("dist.teacher_dir", getattr(cfg.dist, "teacher_dir", None))], "train.out_dir")
