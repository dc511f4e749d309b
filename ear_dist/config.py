"""One config tree for every entry point.

The CLI, YAML/JSON files and the Slurm templates all fill the same dataclasses
below; there is no second way to set a value. Files are merged first, then
``--set section.key=value`` overrides from the command line. Unknown keys and
values of the wrong type are errors that name the full dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    # A local directory in Hugging Face format, or a preset name: tiny, janus-pro-1b, janus-pro-7b.
    path: str = "tiny"
    # float32 | bfloat16 | float16; "auto" = bfloat16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    seed: int = 0  # for presets built with random weights


@dataclass
class RolloutConfig:
    guidance_weight: float = 5.0  # classifier-free guidance for sampling
    temperature: float = 1.0
    top_k: int = 0  # 0 = full distribution
    greedy: bool = False
    batch_size: int = 8


@dataclass
class TrainableConfig:
    first_k_layers: int = 5
    # all: every module of the first k layers; attention: q/k/v/o projections only
    modules: str = "attention"
    # explicit fnmatch patterns on parameter names; when non-empty they replace the two above
    patterns: list[str] = field(default_factory=list)


@dataclass
class ConceptOverride:
    """Per-concept settings for joint multi-concept runs (any None inherits from erase)."""

    window_len: Optional[int] = None
    loss_threshold: Optional[float] = None
    erase_guidance: Optional[float] = None


@dataclass
class EraseConfig:
    concept: str = "church"
    # ear | svare | esd
    method: str = "ear"
    # hidden: MSE on the last hidden state (official code); logit: KL on gen-head logits (paper)
    target_mode: str = "hidden"
    erase_guidance: float = 1.0
    loss_threshold: float = 0.05
    window_len: int = 48
    # sequential (generation order) | random
    window_order: str = "sequential"
    # window: optimizer step after each kept window (paper); sequence: one step per pair/batch
    update_mode: str = "window"
    # which prompt of the pair the teacher samples image tokens from: surrogate | target
    rollout_from: str = "surrogate"
    # logit mode: classifier-free guidance weight applied on the teacher side when building targets (0 = off)
    teacher_guidance_weight: float = 0.0
    # S-VARE
    svare_label_prob_max: float = 0.5
    svare_preserve_weight: float = 0.5
    # ESD-style baseline: share of image positions sampled as random patches each step
    esd_patch_fraction: float = 0.25
    # a target prompt without the concept word: warn (count) or fail
    on_missing_concept: str = "warn"
    # windowed loss implementation: auto (Triton on CUDA when importable, else PyTorch) | torch | triton
    loss_backend: str = "auto"
    concepts: dict[str, ConceptOverride] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class EcgConfig:
    """Pair generation (ECG) for `ear-dist data build`."""

    # none: pairs come from data.pairs only | templates | llm
    source: str = "none"
    # the concept to write pairs for; empty = erase.concept
    concept: str = ""
    category: str = ""
    num_pairs: int = 50  # templates: 0 = every combination
    seed: int = 0
    # templates: "{concept}" plus named slots filled from `slots`; surrogates replace the concept
    templates: list[str] = field(default_factory=list)
    surrogates: list[str] = field(default_factory=list)
    slots: dict[str, list[str]] = field(default_factory=dict)
    # any OpenAI-compatible chat endpoint, e.g. http://127.0.0.1:8000/v1
    llm_base_url: str = ""
    llm_models: list[str] = field(default_factory=list)  # several: used in turn
    # the NAME of the environment variable holding the key (the key itself never goes in a config)
    llm_api_key_env: str = ""
    llm_pairs_per_request: int = 10
    llm_temperature: float = 1.0
    llm_max_retries: int = 5
    llm_backoff_s: float = 1.0
    llm_requests_per_minute: float = 60.0
    llm_timeout_s: float = 60.0
    llm_cache_dir: str = ".cache/ecg"
    llm_max_requests: int = 0  # 0 = three times what num_pairs needs
    # drop generated pairs whose target does not contain the concept word
    require_concept_word: bool = True


@dataclass
class VfConfig:
    """The visual filter (VF): teacher rollouts for both prompts + a concept classifier."""

    enabled: bool = False
    # nudenet | resnet50 | hf | module:function
    classifier: str = "nudenet"
    # resnet50: local weights file; hf: local model directory
    classifier_path: str = ""
    # nudenet: min detection score; hf / callables: min probability of the concept
    threshold: float = 0.6
    # nudenet classes that count as the concept (default: exposed breasts, genitalia, buttocks, anus)
    nudenet_classes: list[str] = field(default_factory=list)
    # resnet50: concept -> ImageNet class ids, e.g. {church: [497]}
    class_ids: dict[str, list[int]] = field(default_factory=dict)
    top_k: int = 1
    # hf: concept -> model labels (default: the label equal to the concept name)
    labels: dict[str, list[str]] = field(default_factory=dict)
    batch_size: int = 8  # pairs per rollout batch (two prompts each)
    store_target_tokens: bool = False
    seed: int = 0  # rollout seed of pairs without one: seed + position


@dataclass
class ShardsConfig:
    """WebDataset shards: written by `ear-dist data build`, streamed by training."""

    out_dir: str = "data/shards"
    max_samples_per_shard: int = 10000
    max_shard_bytes: int = 256 * 1024 * 1024
    # exact: every rank the same number of samples per epoch | resampled: endless, with replacement
    mode: str = "exact"
    # exact mode: False pads the last ranks by wrapping around (every sample seen); True drops the rest
    drop_last: bool = False
    # a truncated or corrupt shard: fail | skip (logged; the rank's next readable sample fills in)
    on_corrupt: str = "fail"
    seed: int = 0


@dataclass
class DataConfig:
    # a pairs file (JSON/CSV/JSONL/parquet/HF directory), a shard directory, or empty for built-in pairs
    pairs: str = ""
    # auto | ear-json | ear-csv | copro-json | copro-csv | sixcd | coco | hf | jsonl | shards
    format: str = "auto"
    shuffle: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 0
    # malformed rows: fail | skip (skips are counted and reported)
    on_error: str = "fail"
    ecg: EcgConfig = field(default_factory=EcgConfig)
    vf: VfConfig = field(default_factory=VfConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)


@dataclass
class TrainConfig:
    steps: int = 50
    pairs_per_step: int = 1
    seed: int = 0
    out_dir: str = "runs/erase"
    log_every: int = 1
    checkpoint_every: int = 0  # 0 = only at the end
    max_nonfinite_steps: int = 5
    tensorboard: bool = True


@dataclass
class DistConfig:
    # none | a path to a DeepSpeed JSON config (see ds_configs/)
    deepspeed_config: str = "none"
    # colocated | dedicated | offline
    teacher_placement: str = "colocated"
    teacher_ranks: int = 1  # dedicated placement: how many ranks serve the teacher
    teacher_dir: str = ""  # offline placement: the directory written by `ear-dist teacher precompute`
    backend: str = "auto"  # auto | gloo | nccl
    log_comms: bool = False  # count DeepSpeed's collective bytes per step (benchmarks)
    timeout_s: int = 60


@dataclass
class SlurmConfig:
    """What ``ear-dist submit`` renders into the sbatch templates in slurm/."""

    nodes: int = 1
    gpus_per_node: int = 0
    # ranks per node; 0 = one per GPU (gpus_per_node), or 1 on nodes without GPUs
    tasks_per_node: int = 0
    cpus_per_task: int = 2  # CPUs per rank; OMP_NUM_THREADS of each rank
    partition: str = ""
    time: str = "01:00:00"
    job_name: str = "ear-dist"
    # USR1 this many seconds before the time limit: the ranks checkpoint, the job requeues
    signal_before_s: int = 120
    extra_sbatch: list[str] = field(default_factory=list)  # extra "#SBATCH" options, e.g. --account=abc
    # torchrun: one srun task per node runs torchrun (c10d rendezvous); srun: one srun task per rank;
    # mpi: one srun --mpi=pmix task per rank, ranks from mpi4py
    launcher: str = "torchrun"
    # rendered script, its resolved config and the Slurm logs; "" = <train.out_dir>/slurm
    output_dir: str = ""
    # job arrays: array task i erases concepts[i] with the pairs file concept_pairs[concepts[i]]
    concepts: list[str] = field(default_factory=list)
    concept_pairs: dict[str, str] = field(default_factory=dict)
    array_parallel: int = 0  # at most this many array tasks at once; 0 = no limit
    max_restarts: int = 3  # preemptions requeued before the job gives up
    python: str = ""  # interpreter on the nodes; "" = the one running ear-dist submit
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv activation)
    local_tmp: str = ""  # node-local scratch for caches; "" = $TMPDIR or /tmp on each node
    # python arguments every rank runs in erase_multinode; "" = -m ear_dist erase --config <the job's config>
    rank_args: str = ""
    bench_args: str = ""  # extra arguments of ear-dist bench in the bench template, e.g. --steps 20


@dataclass
class WorldConfig:
    """The synthetic world (ear_dist.world): its data and the tiny model pretrained on it."""

    seed: int = 0
    grid_side: int = 8  # image tokens per side (8 -> 64 image tokens)
    codebook_size: int = 256
    calibration_samples: int = 2000  # rendered images used to set the classifier's thresholds
    # where built world models are cached; empty: $EAR_DIST_CACHE/world or ~/.cache/ear-dist/world
    cache_dir: str = ""
    # the tiny Janus pretrained on the world (`ear-dist world build`)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = 2000  # the learning rate decays over these steps; training stops earlier at the target
    uncond_prob: float = 0.1  # share of training prompts dropped to the unconditional form (for CFG)
    eval_every: int = 200  # steps between checks of the model's own CFG samples
    eval_prompts_per_word: int = 18  # per object word (synonyms included), split evenly over no style and each style
    target_accuracy: float = 0.95  # stop once every object, synonym and style reaches it
    guidance_weight: float = 5.0
    # CPU threads for pretraining, fixed whatever the machine or OMP_NUM_THREADS say: float
    # sums depend on how work is split over threads, so a fixed count makes builds reproducible
    threads: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    world: WorldConfig = field(default_factory=WorldConfig)

    def to_dict(self) -> dict:
        # through JSON so tuples become lists and the dict is plain data (YAML/JSON safe)
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> "Config":
        validate(self)
        return self


# --------------------------------------------------------------------------- building

_CHOICES = {
    "erase.method": ("ear", "svare", "esd"),
    "erase.target_mode": ("hidden", "logit"),
    "erase.window_order": ("sequential", "random"),
    "erase.update_mode": ("window", "sequence"),
    "erase.rollout_from": ("surrogate", "target"),
    "erase.on_missing_concept": ("warn", "fail"),
    "erase.loss_backend": ("auto", "torch", "triton"),
    "trainable.modules": ("all", "attention"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "optim.name": ("adam", "adamw", "sgd"),
    "dist.teacher_placement": ("colocated", "dedicated", "offline"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "data.on_error": ("fail", "skip"),
    "data.format": ("auto", "ear-json", "ear-csv", "copro-json", "copro-csv", "sixcd", "coco", "hf", "jsonl", "shards"),
    "data.ecg.source": ("none", "templates", "llm"),
    "data.shards.mode": ("exact", "resampled"),
    "data.shards.on_corrupt": ("fail", "skip"),
    "slurm.launcher": ("torchrun", "srun", "mpi"),
}


def validate(cfg: Config) -> None:
    """Check values that types alone do not catch; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    positives = [
        "erase.window_len", "train.steps", "train.pairs_per_step", "rollout.batch_size",
        "data.ecg.llm_pairs_per_request", "data.vf.batch_size", "data.vf.top_k",
        "data.shards.max_samples_per_shard", "data.shards.max_shard_bytes",
        "world.calibration_samples", "world.hidden_size", "world.num_layers", "world.num_heads",
        "world.batch_size", "world.max_steps", "world.eval_every", "world.eval_prompts_per_word",
        "world.threads",
    ]
    for key in positives:
        if get_key(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_key(cfg, key)}")
    if cfg.erase.loss_threshold < 0:
        raise ConfigError(f"erase.loss_threshold: must be >= 0, got {cfg.erase.loss_threshold}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if cfg.trainable.first_k_layers < 0:
        raise ConfigError("trainable.first_k_layers: must be >= 0")
    if not 0.0 < cfg.erase.esd_patch_fraction <= 1.0:
        raise ConfigError("erase.esd_patch_fraction: must be in (0, 1]")
    if cfg.world.grid_side < 4:
        raise ConfigError(f"world.grid_side: must be >= 4, got {cfg.world.grid_side}")
    if not 0.0 <= cfg.world.uncond_prob < 1.0:
        raise ConfigError(f"world.uncond_prob: must be in [0, 1), got {cfg.world.uncond_prob}")
    if cfg.world.hidden_size % cfg.world.num_heads:
        raise ConfigError(f"world.hidden_size ({cfg.world.hidden_size}) must be divisible by world.num_heads "
                          f"({cfg.world.num_heads})")
    if cfg.erase.method == "svare" and cfg.erase.rollout_from == "target":
        raise ConfigError("erase.rollout_from: target with erase.method=svare would train the student toward the "
                          "concept's own image tokens; S-VARE needs the surrogate's rollouts (rollout_from=surrogate)")
    for name, ov in cfg.erase.concepts.items():
        if ov.window_len is not None and ov.window_len < 1:
            raise ConfigError(f"erase.concepts.{name}.window_len: must be >= 1, got {ov.window_len}")
        if ov.loss_threshold is not None and ov.loss_threshold < 0:
            raise ConfigError(f"erase.concepts.{name}.loss_threshold: must be >= 0")
    _validate_slurm(cfg.slurm)


def _validate_slurm(slurm: SlurmConfig) -> None:
    for key in ("nodes", "cpus_per_task"):
        if getattr(slurm, key) < 1:
            raise ConfigError(f"slurm.{key}: must be >= 1, got {getattr(slurm, key)}")
    for key in ("gpus_per_node", "tasks_per_node", "signal_before_s", "array_parallel", "max_restarts"):
        if getattr(slurm, key) < 0:
            raise ConfigError(f"slurm.{key}: must be >= 0, got {getattr(slurm, key)}")
    if slurm.gpus_per_node and slurm.tasks_per_node > slurm.gpus_per_node:
        raise ConfigError(
            f"slurm.tasks_per_node: {slurm.tasks_per_node} ranks per node but slurm.gpus_per_node is "
            f"{slurm.gpus_per_node}; each rank needs its own GPU (0 = one rank per GPU)")
    if not slurm.job_name or any(c.isspace() for c in slurm.job_name):
        raise ConfigError(f"slurm.job_name: must be non-empty without spaces, got {slurm.job_name!r}")
    seen = set()
    for i, concept in enumerate(slurm.concepts):
        if not concept.strip():
            raise ConfigError(f"slurm.concepts[{i}]: empty concept name")
        if concept in seen:
            raise ConfigError(f"slurm.concepts[{i}]: {concept!r} is listed twice")
        seen.add(concept)


def get_key(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(
                f"{prefix}{k}: unknown key (known keys of {prefix.rstrip('.') or 'the config'}: "
                f"{', '.join(sorted(names))})"
            )
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_file(path: Union[str, Path]) -> dict:
    """Read a YAML or JSON config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # parse errors carry line numbers in their message
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": parsed}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. erase.window_len=24")
    key, raw = text.split("=", 1)
    key = key.strip()
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:
        value = raw
    node: dict = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def load_config(
    files: Optional[list] = None,
    overrides: Optional[list[str]] = None,
    base: Optional[dict] = None,
) -> Config:
    """Merge ``base``, then each file, then each ``key=value`` override, and validate."""
    data: dict = dict(base or {})
    for f in files or []:
        data = _merge(data, read_file(f))
    for o in overrides or []:
        data = _merge(data, parse_override(o))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def add_config_args(p) -> None:
    """The config flags shared by every job command."""
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML/JSON config (repeatable; later wins)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key, e.g. --set erase.window_len=24 (repeatable)",
    )


def config_from_args(args, base: Optional[dict] = None) -> Config:
    return load_config(files=args.config, overrides=args.overrides, base=base)
