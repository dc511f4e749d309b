"""Checks that stop a Slurm job before any training starts.

At submit time (``check_submission``): every concept of a job array has a pairs file
that exists and holds pairs; the erase job's own pairs too; the GPUs and nodes asked
for exist in the partition (from ``sinfo``, when it answers). Inside the job
(``check_allocation``, ``array_task_env``): the allocation really has the GPUs the
config asks for, and the array task's index names a concept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ear_dist.config import Config, ConfigError, load_config
from ear_dist.errors import InputError
from ear_dist.launch.env import run_command


class SlurmJobError(InputError, ValueError):
    """A Slurm job that cannot run as configured; the message names the key or variable."""


def ranks_per_node(cfg: Config) -> int:
    """Ranks on each node: slurm.tasks_per_node, else one per GPU, else 1."""
    return cfg.slurm.tasks_per_node or cfg.slurm.gpus_per_node or 1


def concept_dir_name(concept: str) -> str:
    """The directory of one concept under train.out_dir ("Van Gogh" -> "Van_Gogh")."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", concept.strip()).strip("._")
    if not name:
        raise SlurmJobError(f"concept {concept!r} gives no usable directory name")
    return name


def concept_overrides(cfg: Config, concept: str) -> list[str]:
    """The ``--set`` overrides an array task adds for ``concept`` (values YAML-quoted)."""
    pairs = cfg.slurm.concept_pairs[concept]
    out_dir = Path(cfg.train.out_dir) / concept_dir_name(concept)
    return [f"erase.concept={json.dumps(concept)}", f"data.pairs={json.dumps(str(pairs))}",
            f"train.out_dir={json.dumps(str(out_dir))}"]


# ------------------------------------------------------------------------- submit time
def _count_pairs(path: str, cfg: Config, concept: str, key: str) -> int:
    from ear_dist.data.readers import PairReadError, read_pairs

    if not path:
        raise SlurmJobError(f"{key}: concept {concept!r} has no pairs file")
    p = Path(path)
    if not p.exists():
        raise SlurmJobError(f"{key}: pairs file {p} of concept {concept!r} does not exist")
    try:
        pairs = read_pairs(p, cfg.data.format, cfg.data.on_error, concept)
    except PairReadError as e:
        raise SlurmJobError(f"{key}: concept {concept!r}: {e}") from None
    if not pairs:
        raise SlurmJobError(f"{key}: pairs file {p} of concept {concept!r} holds no prompt pairs")
    return len(pairs)


def check_concepts(cfg: Config) -> dict[str, int]:
    """Every concept of the array has a readable, non-empty pairs file; returns pair counts.

    Each concept's own config (the array task's overrides applied) must validate too.
    """
    slurm = cfg.slurm
    if not slurm.concepts:
        raise SlurmJobError("slurm.concepts: the erase_array template needs at least one concept "
                            "(e.g. concepts: [church, Van Gogh] with concept_pairs for each)")
    unknown = [c for c in slurm.concept_pairs if c not in slurm.concepts]
    if unknown:
        raise SlurmJobError(f"slurm.concept_pairs: {', '.join(map(repr, unknown))} not in slurm.concepts "
                            f"({', '.join(map(repr, slurm.concepts))})")
    counts, dirs = {}, {}
    for i, concept in enumerate(slurm.concepts):
        key = f"slurm.concept_pairs.{concept}"
        if concept not in slurm.concept_pairs:
            raise SlurmJobError(f"slurm.concepts[{i}]: concept {concept!r} has no pairs file in slurm.concept_pairs")
        counts[concept] = _count_pairs(slurm.concept_pairs[concept], cfg, concept, key)
        name = concept_dir_name(concept)
        if name in dirs:
            raise SlurmJobError(f"slurm.concepts: {dirs[name]!r} and {concept!r} would share the output "
                                f"directory {name}; rename one")
        dirs[name] = concept
        load_config(base=cfg.to_dict(), overrides=concept_overrides(cfg, concept))
    return counts


def check_erase_pairs(cfg: Config) -> int:
    """The erase job's data.pairs exists and holds pairs; returns the count."""
    if not cfg.data.pairs:
        raise SlurmJobError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    return _count_pairs(cfg.data.pairs, cfg, cfg.erase.concept, "data.pairs")


@dataclass
class PartitionInfo:
    """What sinfo says about a partition: node count and the most GPUs any node has."""

    name: str
    nodes: int
    max_gpus_per_node: int
    gres: str


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in a sinfo Gres string: "gpu:2", "gpu:a100:8(S:0-1),shard:4" -> 2, 8."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        parts = re.sub(r"\(.*\)", "", item.strip()).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partition_info(partition: str = "", run: Callable[[list[str]], Optional[str]] = run_command) -> Optional[PartitionInfo]:
    """The partition (the default one when ``partition`` is empty) from ``sinfo``; None when sinfo does not answer."""
    out = run(["sinfo", "-h", "-o", "%P|%D|%G"])
    if not out:
        return None
    found: Optional[PartitionInfo] = None
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or not fields[1].isdigit():
            continue
        name, nodes, gres = fields
        is_default = name.endswith("*")
        name = name.rstrip("*")
        if (partition and name != partition) or (not partition and not is_default):
            continue
        if found is None:
            found = PartitionInfo(name, 0, 0, gres)
        found.nodes += int(nodes)
        found.max_gpus_per_node = max(found.max_gpus_per_node, gpus_in_gres(gres))
    return found


def check_partition(cfg: Config, run: Callable[[list[str]], Optional[str]] = run_command) -> Optional[PartitionInfo]:
    """Nodes and GPUs per node asked for must exist in the partition (skipped when sinfo does not answer)."""
    slurm = cfg.slurm
    info = partition_info(slurm.partition, run)
    if info is None:
        if slurm.partition and run(["sinfo", "-h", "-o", "%P"]) is not None:
            raise SlurmJobError(f"slurm.partition: partition {slurm.partition!r} is not in sinfo")
        return None
    if slurm.nodes > info.nodes:
        raise SlurmJobError(f"slurm.nodes: {slurm.nodes} nodes asked for, partition {info.name} has {info.nodes}")
    if slurm.gpus_per_node > info.max_gpus_per_node:
        raise SlurmJobError(
            f"slurm.gpus_per_node: {slurm.gpus_per_node} GPUs per node asked for, but the nodes of partition "
            f"{info.name} have at most {info.max_gpus_per_node} (sinfo Gres: {info.gres})")
    return info


def check_inputs_exist(cfg: Config) -> None:
    """The model (a directory or a preset name) and the DeepSpeed config the job loads exist."""
    if not Path(cfg.model.path).exists():
        from ear_dist.models.janus.presets import PRESETS

        if cfg.model.path not in PRESETS:
            raise SlurmJobError(f"model.path: {cfg.model.path} does not exist and is not a preset "
                                f"({', '.join(PRESETS)})")
    if cfg.dist.deepspeed_config != "none":
        from ear_dist.distributed.deepspeed_engine import resolve_ds_config

        try:
            resolve_ds_config(cfg.dist.deepspeed_config)
        except ConfigError as e:
            raise SlurmJobError(str(e)) from None


def check_eval_inputs(cfg: Config) -> dict:
    """The eval job's suites and deltas are given and its delta files exist (suites are read in the job)."""
    if not cfg.eval.suites:
        raise SlurmJobError("eval.suites: the eval template needs at least one suite (a file, coco or world)")
    for spec in cfg.eval.deltas:
        path = spec if Path(spec).exists() else spec.partition("=")[2] or spec
        if not Path(path).is_file():
            raise SlurmJobError(f"eval.deltas: {path} does not exist")
    return {"suites": len(cfg.eval.suites), "columns": 1 + len(cfg.eval.deltas)}


def check_submission(cfg: Config, template: str, run: Callable[[list[str]], Optional[str]] = run_command) -> dict:
    """Everything checkable before sbatch; raises SlurmJobError naming the key. Returns facts found."""
    facts: dict = {}
    runs_erasure = template in ("erase_array", "bench") or (template == "erase_multinode" and not cfg.slurm.rank_args)
    if template == "eval":
        check_inputs_exist(cfg)
        facts["eval"] = check_eval_inputs(cfg)
    if runs_erasure:
        check_inputs_exist(cfg)
    if template == "erase_array":
        facts["pairs_per_concept"] = check_concepts(cfg)
    elif template == "erase_multinode" and not cfg.slurm.rank_args:
        facts["pairs"] = check_erase_pairs(cfg)
    info = check_partition(cfg, run)
    facts["partition"] = info.name if info else None
    return facts


# ---------------------------------------------------------------------------- in the job
def visible_gpus(environ: Mapping[str, str]) -> tuple[Optional[int], str]:
    """GPUs this node's allocation gives: the fewest any of CUDA_VISIBLE_DEVICES,
    SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS says; None when none is set. Returns (count, evidence)."""
    counts, evidence = [], []
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        counts.append(len([d for d in cvd.split(",") if d.strip() and d.strip() != "NoDevFiles"]))
        evidence.append(f"CUDA_VISIBLE_DEVICES={cvd!r}")
    on_node = environ.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit():
        counts.append(int(on_node))
        evidence.append(f"SLURM_GPUS_ON_NODE={on_node}")
    job_gpus = environ.get("SLURM_JOB_GPUS")
    if job_gpus is not None:
        counts.append(len([d for d in job_gpus.split(",") if d.strip()]))
        evidence.append(f"SLURM_JOB_GPUS={job_gpus!r}")
    if not counts:
        return None, "none of CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS is set"
    return min(counts), ", ".join(evidence)


def check_allocation(cfg: Config, environ: Mapping[str, str]) -> Optional[int]:
    """The node has at least slurm.gpus_per_node GPUs; returns the count seen (None on a CPU job)."""
    wanted = cfg.slurm.gpus_per_node
    if wanted == 0:
        return None
    count, evidence = visible_gpus(environ)
    node = environ.get("SLURMD_NODENAME", "this node")
    if count is None or count < wanted:
        raise SlurmJobError(
            f"slurm.gpus_per_node: the config asks for {wanted} GPUs per node, but the allocation on {node} "
            f"has {count or 0} ({evidence}); submit with --gpus-per-node={wanted} or lower slurm.gpus_per_node")
    return count


def array_task_env(cfg: Config, environ: Mapping[str, str], config_path: str = "the config") -> dict[str, str]:
    """The concept of this array task, as variables for the batch script.

    Raises SlurmJobError when SLURM_ARRAY_TASK_ID is unset or outside slurm.concepts, or
    the concept's pairs file is gone.
    """
    concepts = cfg.slurm.concepts
    task = environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise SlurmJobError("SLURM_ARRAY_TASK_ID is unset: this is not an array task "
                            "(submit erase_array with ear-dist submit, or sbatch --array)")
    if not task.isdigit():
        raise SlurmJobError(f"SLURM_ARRAY_TASK_ID={task!r} is not a non-negative integer")
    index = int(task)
    if not concepts:
        raise SlurmJobError(f"slurm.concepts in {config_path} is empty: no concept for array task {index}")
    if index >= len(concepts):
        raise SlurmJobError(
            f"SLURM_ARRAY_TASK_ID={index} is out of range: slurm.concepts in {config_path} has {len(concepts)} "
            f"concepts (array indices 0-{len(concepts) - 1}: {', '.join(concepts)}); "
            f"submit with --array=0-{len(concepts) - 1}")
    concept = concepts[index]
    pairs = cfg.slurm.concept_pairs.get(concept, "")
    if not pairs or not Path(pairs).exists():
        raise SlurmJobError(f"slurm.concept_pairs.{concept}: pairs file {pairs or '(none)'} of array task "
                            f"{index} does not exist")
    out_dir = str(Path(cfg.train.out_dir) / concept_dir_name(concept))
    values = {"EAR_CONCEPT": concept, "EAR_CONCEPT_PAIRS": pairs, "EAR_CONCEPT_OUT_DIR": out_dir}
    values.update({f"{k}_YAML": json.dumps(v) for k, v in list(values.items())})
    return values
