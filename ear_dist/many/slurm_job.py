"""The many-concept job on Slurm (``ear-dist submit --template erase_many --concepts FILE``).

Route ``array``: a job array with one task per concept (``ear-dist erase-many --array-task
$SLURM_ARRAY_TASK_ID``: pairs, filter and training of that concept) and a second job,
submitted with ``--dependency=afterok:<array>``, that runs ``ear-dist erase-many`` again
in the same directory: the finished stages are skipped, so it merges the deltas, evaluates
and writes the report. Route ``joint``: that second script alone, which does every stage.

``train.out_dir`` is the job's directory. Each task is one process on one node (the
many-concept stages run in one process; a task's training uses one device), so the
rendered config says ``slurm.nodes=1`` and one task per node. The concepts file is
written, checked and with absolute paths, beside the script and its config.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ear_dist.config import Config, from_dict
from ear_dist.many.spec import load_spec
from ear_dist.slurm.checks import check_inputs_exist, check_submission
from ear_dist.slurm.render import (TEMPLATE_DIR, RenderedJob, job_config, render_text, resolve_paths,
                                   sbatch_directives)

TEMPLATE = "erase_many"
ARRAY, FINISH = "erase_many_array", "erase_many_finish"


@dataclass
class ManyJobScripts:
    """The rendered scripts: ``array`` (None for the joint route) then ``finish``."""

    array: Optional[RenderedJob]
    finish: RenderedJob
    concepts_file: Path


def one_process_config(cfg: Config) -> Config:
    """``cfg`` with one node, one task and at most one GPU per job: what a many-concept task uses."""
    out = from_dict(Config, cfg.to_dict())
    out.slurm.nodes, out.slurm.tasks_per_node = 1, 1
    out.slurm.gpus_per_node = min(out.slurm.gpus_per_node, 1)
    return out


def render_many_job(cfg: Config, concepts: str, cwd: Optional[Path] = None) -> ManyJobScripts:
    """Check the concepts file and the config, and write the scripts, their config and the concepts file."""
    import hashlib

    from ear_dist.config import save_config

    cwd = Path(cwd or os.getcwd()).resolve()
    spec = load_spec(concepts)
    job = job_config(one_process_config(cfg), TEMPLATE, cwd)
    s = job.slurm
    out_dir = Path(s.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    concepts_copy = out_dir / f"{s.job_name}-{TEMPLATE}.concepts.json"
    concepts_copy.write_text(json.dumps(spec.file_dict(), indent=2))
    config_path = out_dir / f"{s.job_name}-{TEMPLATE}.config.yaml"
    save_config(job, config_path)
    digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
    job_dir = job.train.out_dir
    scripts = {}
    for kind in ([ARRAY] if spec.route == "array" else []) + [FINISH]:
        # the array's directives are erase_array's (--array=0-N, one log per task), with this job's concept list
        directives = sbatch_directives(_with_concepts(job, spec.names) if kind == ARRAY else job,
                                       "erase_array" if kind == ARRAY else kind, cwd)
        values = {
            "sbatch_directives": "\n".join(directives), "python": shlex.quote(s.python),
            "config_file": shlex.quote(str(config_path)), "config_sha256": digest, "launcher": s.launcher,
            "nodes": "1", "ranks_per_node": "1", "gpus_per_node": str(s.gpus_per_node),
            "cpus_per_rank": str(s.cpus_per_task), "max_restarts": str(s.max_restarts),
            "signal_before_s": str(s.signal_before_s), "local_tmp": shlex.quote(s.local_tmp),
            "setup_lines": "\n".join(s.setup), "num_concepts": str(len(spec.concepts)),
            "concept_names": ", ".join(spec.names), "route": spec.route,
            "concepts_file": shlex.quote(str(concepts_copy)), "job_dir": shlex.quote(job_dir),
            "finish_part": ", part 2 of 2 (after the array)" if spec.route == "array" else "",
        }
        source = TEMPLATE_DIR / f"{kind}.sbatch"
        text = render_text(source.read_text(encoding="utf-8"), values, source.parent, str(source))
        script = out_dir / f"{s.job_name}-{kind}.sbatch"
        script.write_text(text, encoding="utf-8")
        script.chmod(0o755)
        log = next(d for d in directives if d.startswith("#SBATCH --output=")).split("=", 1)[1]
        scripts[kind] = RenderedJob(kind, script, config_path, text, log)
    return ManyJobScripts(scripts.get(ARRAY), scripts[FINISH], concepts_copy)


def _with_concepts(cfg: Config, names: list[str]) -> Config:
    out = from_dict(Config, cfg.to_dict())
    out.slurm.concepts = list(names)
    return out


def check_many_submission(cfg: Config) -> dict:
    """What ``submit`` checks before sbatch for this job: the model path and the partition (sinfo)."""
    resolved = resolve_paths(one_process_config(cfg))
    check_inputs_exist(resolved)
    return check_submission(resolved, TEMPLATE)


def submit_many(scripts: ManyJobScripts, submit) -> list[str]:
    """Submit the array, then the finish script after it (``afterok``); ``submit(script, *sbatch_args)`` -> job id."""
    ids = []
    if scripts.array is not None:
        ids.append(submit(str(scripts.array.script)))
        ids.append(submit(str(scripts.finish.script), f"--dependency=afterok:{ids[0]}"))
    else:
        ids.append(submit(str(scripts.finish.script)))
    return ids
