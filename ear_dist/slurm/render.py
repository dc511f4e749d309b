"""Fill the sbatch templates in slurm/ from one Config and write the job files.

The templates ship inside the package (``templates/`` beside this module), so an installed
ear-dist renders them from any directory; jobs run the interpreter that submitted them
(``slurm.python``) and import ear-dist from its installation, not from a checkout.
Templates hold ``{{name}}`` placeholders (Slurm and bash use ``$`` and ``%``, so the
delimiter is double braces) and ``{{include:common/FILE}}`` lines that paste a shared
fragment. Every placeholder needs a value; a misspelt one is an error naming it.

``render_job`` writes two files side by side: the sbatch script and the resolved config
(YAML, every path made absolute) that the script runs, with its sha256 in the script so
a job never runs a config other than the one checked at submit time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ear_dist.config import Config, from_dict, save_config
from ear_dist.slurm.checks import SlurmJobError, ranks_per_node

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = ("erase_multinode", "erase_array", "bench", "eval")

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
_INCLUDE = re.compile(r"\{\{\s*include:([\w./-]+)\s*\}\}")


@dataclass
class RenderedJob:
    """The files of one rendered job."""

    template: str
    script: Path
    config: Path
    text: str
    log_pattern: str


def template_path(name: str) -> Path:
    """A template by name (erase_multinode, erase_array, bench, eval) or by file path."""
    if name in TEMPLATES:
        return TEMPLATE_DIR / f"{name}.sbatch"
    path = Path(name)
    if path.is_file():
        return path
    raise SlurmJobError(f"--template {name!r}: not one of {', '.join(TEMPLATES)} and not a file")


def render_text(text: str, values: dict[str, str], base_dir: Path, source: str = "template") -> str:
    """Paste includes (relative to ``base_dir``), then replace every ``{{name}}`` with ``values[name]``."""

    def include(match: re.Match) -> str:
        # A user's own template may include the shipped fragments.
        path = next((d / match.group(1) for d in (base_dir, TEMPLATE_DIR) if (d / match.group(1)).is_file()), None)
        if path is None:
            raise SlurmJobError(f"{source}: include {match.group(1)!r} not found in {base_dir} or {TEMPLATE_DIR}")
        return path.read_text(encoding="utf-8").rstrip("\n")

    text = _INCLUDE.sub(include, text)

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise SlurmJobError(f"{source}: placeholder {{{{{name}}}}} has no value "
                                f"(known: {', '.join(sorted(values))})")
        return str(values[name])

    return _PLACEHOLDER.sub(substitute, text)


def _absolute(path: str, cwd: Path) -> str:
    return str((cwd / path).resolve()) if path else path


def resolve_paths(cfg: Config, cwd: Optional[Path] = None) -> Config:
    """A copy of ``cfg`` whose file paths are absolute, so the job finds them from any directory.

    model.path stays as is when it is a preset name rather than an existing path.
    """
    cwd = Path(cwd or os.getcwd())
    out = from_dict(Config, cfg.to_dict())
    if (cwd / out.model.path).exists():
        out.model.path = _absolute(out.model.path, cwd)
    out.data.pairs = _absolute(out.data.pairs, cwd)
    out.train.out_dir = _absolute(out.train.out_dir, cwd)
    if out.dist.deepspeed_config != "none" and (cwd / out.dist.deepspeed_config).is_file():
        out.dist.deepspeed_config = _absolute(out.dist.deepspeed_config, cwd)  # a packaged name stays a name
    out.slurm.concept_pairs = {c: _absolute(p, cwd) for c, p in out.slurm.concept_pairs.items()}
    out.slurm.output_dir = _absolute(out.slurm.output_dir or str(Path(out.train.out_dir) / "slurm"), cwd)
    if out.slurm.local_tmp:
        out.slurm.local_tmp = _absolute(out.slurm.local_tmp, cwd)
    _absolute_eval_paths(out, cwd)
    out.slurm.python = out.slurm.python or sys.executable
    return out


def _absolute_eval_paths(cfg: Config, cwd: Path) -> None:
    """eval's files made absolute; a suite or delta that is a name (coco, world, NAME=PATH) keeps its name."""
    e = cfg.eval
    e.out_dir = _absolute(e.out_dir, cwd)
    for key in ("clip_path", "fid_model_path", "fid_reference", "coco_prompts", "perplexity_text", "stats_cache_dir"):
        setattr(e, key, _absolute(getattr(e, key), cwd))
    if e.classifier.path and (cwd / e.classifier.path).exists():
        e.classifier.path = _absolute(e.classifier.path, cwd)
    e.suites = [_absolute(s, cwd) if (cwd / s).exists() else s for s in e.suites]
    deltas = []
    for spec in e.deltas:
        name, sep, path = spec.partition("=")
        deltas.append(f"{name}={_absolute(path, cwd)}" if sep and not (cwd / spec).exists() else _absolute(spec, cwd))
    e.deltas = deltas


def job_config(cfg: Config, template: str, cwd: Optional[Path] = None) -> Config:
    """The config the job runs, with every path absolute."""
    resolved = resolve_paths(cfg, cwd)
    if template == "bench":
        taken = {"--out", "--baseline"} & {w.split("=")[0] for w in shlex.split(resolved.slurm.bench_args)}
        if taken:
            raise SlurmJobError(f"slurm.bench_args: {', '.join(sorted(taken))} is set by the bench template "
                                f"(output under <train.out_dir>/bench); remove it")
    return resolved.validate()


def baseline_pairs(cfg: Config) -> int:
    """Pairs per step of the bench's one-rank baseline: one student rank's share of the job's, so the
    scaling efficiency compares equal work per GPU."""
    students = cfg.slurm.nodes * ranks_per_node(cfg)
    if cfg.dist.teacher_placement == "dedicated":
        students -= cfg.dist.teacher_ranks
    return max(1, cfg.train.pairs_per_step // max(students, 1))


def sbatch_directives(cfg: Config, template: str, workdir: Path) -> list[str]:
    """The ``#SBATCH`` lines for ``template``."""
    s = cfg.slurm
    ranks = ranks_per_node(cfg)
    tasks, cpus = (1, s.cpus_per_task * ranks) if s.launcher == "torchrun" else (ranks, s.cpus_per_task)
    log = "%x-%A_%a.out" if template == "erase_array" else "%x-%j.out"
    lines = [
        f"--job-name={s.job_name}",
        f"--nodes={s.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus}",
        f"--time={s.time}",
        f"--output={Path(s.output_dir) / log}",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--chdir={workdir}",
        f"--signal=B:USR1@{s.signal_before_s}",
        "--requeue",
    ]
    if s.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.partition:
        lines.append(f"--partition={s.partition}")
    if template == "erase_array":
        limit = f"%{s.array_parallel}" if s.array_parallel else ""
        lines.append(f"--array=0-{len(s.concepts) - 1}{limit}")
    for extra in s.extra_sbatch:
        extra = extra.strip()
        if extra.startswith("#SBATCH"):
            extra = extra[len("#SBATCH"):].strip()
        if not extra.startswith("-"):
            raise SlurmJobError(f"slurm.extra_sbatch: {extra!r} is not an sbatch option (expected e.g. --account=abc)")
        lines.append(extra)
    return [f"#SBATCH {line}" for line in lines]


def _quote_args(text: str) -> str:
    return " ".join(shlex.quote(word) for word in shlex.split(text))


def render_job(cfg: Config, template: str, out: Optional[Path] = None, cwd: Optional[Path] = None) -> RenderedJob:
    """Render ``template`` for ``cfg``; write the script (``out`` or in slurm.output_dir) and its config beside it."""
    cwd = Path(cwd or os.getcwd()).resolve()
    source = template_path(template)
    kind = template if template in TEMPLATES else source.stem
    job = job_config(cfg, kind, cwd)
    s = job.slurm
    script = Path(out).resolve() if out else Path(s.output_dir) / f"{s.job_name}-{kind}.sbatch"
    config_path = script.with_name(script.name.removesuffix(".sbatch") + ".config.yaml")
    script.parent.mkdir(parents=True, exist_ok=True)
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(job, config_path)
    digest = hashlib.sha256(config_path.read_bytes()).hexdigest()

    rank_args = _quote_args(s.rank_args) if s.rank_args else \
        " ".join(shlex.quote(w) for w in ["-m", "ear_dist", "erase", "--no-progress", "--config", str(config_path)])
    directives = sbatch_directives(job, kind, cwd)
    values = {
        "sbatch_directives": "\n".join(directives),
        "python": shlex.quote(s.python),
        "config_file": shlex.quote(str(config_path)),
        "config_sha256": digest,
        "launcher": s.launcher,
        "nodes": str(s.nodes),
        "ranks_per_node": str(ranks_per_node(job)),
        "gpus_per_node": str(s.gpus_per_node),
        "cpus_per_rank": str(s.cpus_per_task),
        "max_restarts": str(s.max_restarts),
        "signal_before_s": str(s.signal_before_s),
        "local_tmp": shlex.quote(s.local_tmp),
        "setup_lines": "\n".join(s.setup),
        "rank_args": rank_args,
        "bench_args": _quote_args(s.bench_args),
        "bench_out": shlex.quote(str(Path(job.train.out_dir) / "bench")),
        "baseline_pairs": str(baseline_pairs(job)),
        "num_concepts": str(len(s.concepts)),
        "concept_names": ", ".join(s.concepts) or "(none)",
    }
    text = render_text(source.read_text(encoding="utf-8"), values, source.parent, str(source))
    script.write_text(text, encoding="utf-8")
    script.chmod(0o755)
    log = next(d for d in directives if d.startswith("#SBATCH --output=")).split("=", 1)[1]
    return RenderedJob(kind, script, config_path, text, log)
