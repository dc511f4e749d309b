"""``ear-dist submit``, ``ear-dist slurm-env`` (run inside jobs) and ``ear-dist array-status``."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

from ear_dist.config import add_config_args, config_from_args
from ear_dist.errors import RunFailure
from ear_dist.slurm.render import TEMPLATES


def register(sub) -> None:
    p = sub.add_parser(
        "submit", help="render an sbatch template from the config and submit it",
        description="Validates the config (pairs per concept, GPUs and nodes against sinfo), renders "
        "slurm/<template>.sbatch with the resolved config beside it, and submits it with sbatch.",
    )
    add_config_args(p)
    p.add_argument("--template", required=True, metavar="NAME|FILE",
                   help=f"one of {', '.join(TEMPLATES)}, erase_many (with --concepts), or a template file")
    p.add_argument("--concepts", default=None, metavar="FILE",
                   help="erase_many: the concepts file of `ear-dist erase-many`; the job's directory is train.out_dir")
    p.add_argument("--dry-run", action="store_true", help="render and print the script; do not submit")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="script path (default <slurm.output_dir>/<job>-<template>.sbatch)")
    p.set_defaults(func=run_submit)

    e = sub.add_parser("slurm-env", help="(inside a job) check the allocation; print the array task's concept")
    add_config_args(e)
    e.add_argument("--check-gpus", action="store_true", help="fail unless the node has slurm.gpus_per_node GPUs")
    e.add_argument("--array-task", action="store_true",
                   help="print shell exports of this array task's concept (SLURM_ARRAY_TASK_ID)")
    e.set_defaults(func=run_slurm_env)

    a = sub.add_parser("array-status", help="which concepts of an array job have their delta")
    add_config_args(a)
    a.add_argument("--json", action="store_true", help="print JSON instead of text")
    a.add_argument("--base", default=None, metavar="MODEL",
                   help="also compare the deltas' changes to this base model (cosine per pair; negative = opposed)")
    a.set_defaults(func=run_array_status)


class SubmitError(RunFailure, RuntimeError):
    """sbatch is missing or refused the job; the message carries sbatch's own words."""


def submit_script(script: str, *sbatch_args: str) -> str:
    """``sbatch --parsable [ARGS] SCRIPT`` -> the job id; raises SubmitError (a RuntimeError) with sbatch's message."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch is not on PATH: submit from a Slurm login node, or use --dry-run")
    result = subprocess.run([sbatch, "--parsable", *sbatch_args, script], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        raise SubmitError(f"sbatch {script} failed with exit code {result.returncode}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def run_submit(args) -> int:
    from ear_dist.slurm.checks import check_submission
    from ear_dist.slurm.render import render_job, resolve_paths, template_path

    cfg = config_from_args(args)
    if (args.template == "erase_many") != (args.concepts is not None):
        from ear_dist.errors import InputError

        raise InputError("--template erase_many and --concepts FILE go together")
    if args.concepts is not None:
        return _submit_many(args, cfg)
    if args.out is not None:
        from ear_dist.paths import output_file

        output_file(args.out, "--out")
    kind = args.template if args.template in TEMPLATES else template_path(args.template).stem
    facts = check_submission(resolve_paths(cfg), kind)
    job = render_job(cfg, args.template, out=args.out)
    print(f"rendered {job.script} (config {job.config}); checks passed: {json.dumps(facts)}", file=sys.stderr)
    if facts.get("partition") is None:
        print("note: sinfo did not answer; nodes and GPUs are checked inside the job only", file=sys.stderr)
    if args.dry_run:
        print(job.text)
        return 0
    try:
        job_id = submit_script(str(job.script))
    except RuntimeError as e:
        print(f"ear-dist: error: {e}", file=sys.stderr)
        return 1
    print(f"submitted batch job {job_id}; log {job.log_pattern}", file=sys.stderr)
    print(job_id)
    return 0


def _submit_many(args, cfg) -> int:
    """The many-concept job: a job array plus a dependent merge/eval job (``ear_dist.many.slurm_job``)."""
    from ear_dist.many.job import job_config
    from ear_dist.many.spec import load_spec
    from ear_dist.many.slurm_job import check_many_submission, render_many_job, submit_many

    args.world = False
    load_spec(args.concepts)  # its errors before the config's
    cfg, _ = job_config(args)  # what `ear-dist erase-many` runs: a world's settings too
    facts = check_many_submission(cfg)
    scripts = render_many_job(cfg, args.concepts)
    jobs = [j for j in (scripts.array, scripts.finish) if j is not None]
    print(f"rendered {', '.join(str(j.script) for j in jobs)} (config {scripts.finish.config}, concepts "
          f"{scripts.concepts_file}); checks passed: {json.dumps(facts)}", file=sys.stderr)
    if args.dry_run:
        print("\n".join(j.text for j in jobs))
        return 0
    try:
        ids = submit_many(scripts, submit_script)
    except RuntimeError as e:
        print(f"ear-dist: error: {e}", file=sys.stderr)
        return 1
    print(f"submitted batch job(s) {', '.join(ids)}" + (" (the second after the array: afterok)" if len(ids) > 1
                                                          else "") + f"; logs {', '.join(j.log_pattern for j in jobs)}",
          file=sys.stderr)
    print(" ".join(ids))
    return 0


def run_slurm_env(args) -> int:
    from ear_dist.slurm.checks import array_task_env, check_allocation

    cfg = config_from_args(args)
    if args.check_gpus:
        check_allocation(cfg, os.environ)
    if args.array_task:
        where = args.config[-1] if args.config else "the config"
        for key, value in array_task_env(cfg, os.environ, where).items():
            print(f"export {key}={shlex.quote(value)}")
    return 0


def run_array_status(args) -> int:
    from ear_dist.slurm.array import collect_concept_deltas

    cfg = config_from_args(args)
    deltas = collect_concept_deltas(cfg)
    agreements = []
    if args.base and len(deltas.found) > 1:
        from ear_dist.models.delta import compare_changes
        from ear_dist.models.family import load_model

        base = load_model(args.base, cfg.model.family, device="cpu", dtype="float32").model.state_dict()
        agreements = compare_changes(base, [o.delta for o in deltas.found])
    if args.json:
        print(json.dumps({
            "concepts": [{"concept": o.concept, "index": o.index, "delta": str(o.delta) if o.delta else None,
                          "trained_concepts": o.trained_concepts, "problem": o.problem} for o in deltas.outputs],
            "agreements": [vars(a) | {"opposed": a.opposed} for a in agreements]}, indent=2))
        return 0 if deltas.complete else 1
    print(deltas.report())
    for a in agreements:
        note = "OPPOSED: composing them weakens both" if a.opposed else "ok"
        print(f"{a.first} vs {a.second}: cosine {a.cosine:+.3f} over {a.shared_tensors} tensors ({note})")
    if deltas.found:
        base = shlex.quote(args.base) if args.base else "MODEL"
        print(f"compose: ear-dist merge --base {base} "
              + " ".join(shlex.quote(a) for a in deltas.merge_args()) + " --out MERGED")
    return 0 if deltas.complete else 1
