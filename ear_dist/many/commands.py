"""``ear-dist erase-many``: a concepts file -> pairs, filter, training, merge, eval -> one report."""

from __future__ import annotations

import sys

from ear_dist.config import add_config_args


def register(sub) -> None:
    p = sub.add_parser("erase-many", help="erase many concepts from a concepts file: pairs, filter, train, "
                                          "merge, eval, one report (resumable)")
    p.add_argument("--concepts", required=True, metavar="FILE", help="the concepts file (YAML or JSON)")
    p.add_argument("--out", required=True, metavar="DIR", help="the job's directory; a rerun into it resumes")
    p.add_argument("--route", choices=["joint", "array"], default=None,
                   help="joint: one run on every concept's pairs; array: one run per concept, deltas merged "
                        "(default: the file's route)")
    p.add_argument("--array-task", type=int, default=None, metavar="I",
                   help="route array: pairs, filter and training of concept I only (what a Slurm array task runs)")
    p.add_argument("--world", action="store_true",
                   help="run on the planted-concept world's model (built once, then cached; world.* settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="clear --out when it holds another job (never an input)")
    p.add_argument("--progress", action="store_true", help="progress bars for training, filter and eval")
    add_config_args(p)
    p.set_defaults(func=run_erase_many)


def run_erase_many(args) -> int:
    from ear_dist.many.job import ManyConceptJob, Stopped, check_job, job_config, prepare_out_dir
    from ear_dist.slurm.preempt import PreemptionHandler
    from ear_dist.train.commands import STOP_SIGNALS
    from ear_dist.many.spec import check_entry_for_route, load_spec

    spec = load_spec(args.concepts)
    if args.route:
        spec.route = args.route
    if args.array_task is not None:
        spec.route = "array"
        check_entry_for_route(spec, args.array_task)
    cfg, target = job_config(args)
    check_job(spec, target, cfg)
    out = prepare_out_dir(args.out, spec, cfg, args.overwrite)
    print(f"erase-many: {len(spec.concepts)} concepts ({', '.join(spec.names)}), route {spec.route}, "
          f"{'world' if target.is_world else 'model'} {target.model_path}, out {out}", flush=True)
    with PreemptionHandler(STOP_SIGNALS, abort_on_repeat=True) as handler:
        job = ManyConceptJob(spec, cfg, target, out, log=lambda line: print(line, flush=True),
                             progress=args.progress, should_stop=lambda: handler.requested)
        try:
            job.run(args.array_task)
        except Stopped as e:
            print(f"ear-dist: stopped by {handler.signal_name}: {e}; run the same command to resume",
                  file=sys.stderr, flush=True)
            return handler.exit_code
    return 0
