"""``ear-dist eval``: the base model and each delta on evaluation suites, one report.

    ear-dist eval --config job.yaml --set model.path=/models/Janus-Pro-7B \
        --delta runs/church/delta.safetensors --suite church.yaml --suite coco --out runs/eval

Runs on one process or many (torchrun, srun, mpirun: prompts are split across ranks and
gathered on rank 0); a rerun into the same --out generates only what is missing.
"""

from __future__ import annotations

import sys

from ear_dist.config import add_config_args, config_from_args
from ear_dist.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate the base model and deltas: concept accuracy, preservation, "
                                    "FID, CLIP score, perplexity; report with before/after grids")
    p.add_argument("--delta", action="append", default=[], metavar="[NAME=]PATH",
                   help="a delta applied in memory: one report column (repeatable); adds to eval.deltas")
    p.add_argument("--suite", action="append", default=[], metavar="NAME|FILE",
                   help="a suite file, a prompt file, coco, world[:concept], attack:inversion|search:<concept> or "
                        "module:function (repeatable); "
                        "adds to eval.suites")
    p.add_argument("--out", default=None, help="output directory (default eval.out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it exists and was not written by `ear-dist eval` (never an input)")
    p.add_argument("--table", default=None, metavar="REPORT_JSON",
                   help="print the Table 1 layout (concept, model, Acc., FID, CLIP) of a report.json and exit")
    add_config_args(p)
    p.set_defaults(func=run_eval_cmd)


def run_eval_cmd(args) -> int:
    import json
    from pathlib import Path

    from ear_dist.data.classifiers import ClassifierError
    from ear_dist.eval.evaluate import run_eval
    from ear_dist.eval.report import table1_markdown

    if args.table:
        path = Path(args.table)
        if not path.is_file():
            raise InputError(f"--table: {path} does not exist (ear-dist eval writes <out>/report.json)")
        saved = json.loads(path.read_text(encoding="utf-8"))
        rows = saved.get("table1")
        if not rows:
            raise InputError(f"{path}: no table1 rows (the report has no suite with concept prompts)")
        print("\n".join(table1_markdown(rows, saved.get("clip_convention", "cosine"))))
        return 0
    cfg = config_from_args(args)
    suites = list(cfg.eval.suites) + list(args.suite)
    deltas = list(cfg.eval.deltas) + list(args.delta)
    out = eval_output(args.out or cfg.eval.out_dir, "--out" if args.out else "eval.out_dir", args.overwrite,
                      cfg.model.path, suites, deltas)
    try:
        report = run_eval(cfg, suites, deltas, out, progress=not args.no_progress)
    except ClassifierError as e:
        raise InputError(str(e)) from None
    if report is None:  # ranks other than 0
        return 0
    if report["table1"]:
        print("\n".join(table1_markdown(report["table1"], report["clip_convention"])))
    # a requested metric that could not run is a failure the user must see, after the others ran; the last line
    # of a job log says why the job failed
    if report["not_run"]:
        print(f"ear-dist: error: {len(report['not_run'])} requested metric(s) could not run, the report holds the "
              f"others ({out / 'report.md'}): {report['not_run'][0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def eval_output(out, flag: str, overwrite: bool, model: str, suites: list, deltas: list):
    """The eval directory checked before any work (``ear_dist.paths``); rank 0 marks it as an eval's.

    A rerun of ``eval`` into its own directory reuses what it generated; another directory needs --overwrite."""
    from ear_dist.paths import output_dir, write_marker
    from ear_dist.telemetry.logs import current_rank

    protect = [("model", model)]
    for d in deltas:
        protect += [("delta", str(d)), ("delta", str(d).split("=", 1)[-1])]
    protect += [("suite file", str(s)) for s in suites if isinstance(s, str)]
    path = output_dir(out, "eval", flag=flag, overwrite=overwrite, protect=protect)
    if current_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, "eval")
    return path
