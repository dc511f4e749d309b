"""What types alone do not check: ranges and relations between keys of a ``Config``.

This module reads a config by attribute and type hints and imports nothing of
``schema``, so that ``Config.validate`` (in ``schema``) and ``loading`` both use it
and no two config modules import each other.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal

from ear_dist.config.layers import check_layers_spec
from ear_dist.errors import InputError


class ConfigError(InputError, ValueError):
    """A config value that cannot be used; the message names the dotted key."""

    kind = "config error"


def check_choice(value: Any, tp: Any, key: str) -> Any:
    """``value`` when it is one of the ``Literal`` type's values, else a ConfigError listing them."""
    choices = typing.get_args(tp)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def validate(cfg: Any) -> None:
    """Check values that types alone do not catch; raise ConfigError naming the key."""
    # Files and --set are checked against the Literal types while loading; this catches
    # a config built or changed in Python.
    _validate_choices(cfg, "")
    positives = [
        "erase.window_len", "erase.window_scales", "train.steps", "train.pairs_per_step", "train.log_every",
        "rollout.batch_size",
        "data.ecg.llm_pairs_per_request", "data.vf.batch_size", "data.vf.top_k",
        "data.shards.max_samples_per_shard", "data.shards.max_shard_bytes",
        "world.calibration_samples", "world.hidden_size", "world.num_layers", "world.num_heads",
        "world.batch_size", "world.max_steps", "world.decay_steps", "world.eval_every", "world.eval_prompts_per_word",
        "world.threads", "eval.images_per_prompt", "eval.batch_size", "eval.coco_size", "eval.world_prompts",
        "eval.classifier.top_k", *(f"eval.attack.{k}" for k in (
            "targets", "inversion_steps", "inversion_tokens", "inversion_batch", "search_steps", "search_candidates",
            "search_top_k", "search_length", "search_batch", "search_prompts")),
        *(f"erase.adversarial.{k}" for k in ("prompts", "targets", "steps", "candidates", "top_k", "length", "batch",
                                             "tokens")),
    ]
    for key in positives:
        if get_key(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_key(cfg, key)}")
    if not 0.0 < cfg.erase.svare_bit_error_share <= 1.0:
        raise ConfigError(f"erase.svare_bit_error_share: must be in (0, 1], got {cfg.erase.svare_bit_error_share}")
    _check_adversarial(cfg)
    if cfg.erase.svare_scales < 0:
        raise ConfigError(f"erase.svare_scales: must be >= 0, got {cfg.erase.svare_scales}")
    if cfg.erase.loss_threshold < 0:
        raise ConfigError(f"erase.loss_threshold: must be >= 0, got {cfg.erase.loss_threshold}")
    if cfg.eval.attack.search_template.count("{}") != 1:
        raise ConfigError(f"eval.attack.search_template: must hold one '{{}}' for the searched tokens, got "
                          f"{cfg.eval.attack.search_template!r}")
    if cfg.eval.kv_cache_gib < 0:
        raise ConfigError(f"eval.kv_cache_gib: must be >= 0, got {cfg.eval.kv_cache_gib}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    try:
        check_layers_spec(cfg.trainable.layers)
    except InputError as e:
        raise ConfigError(str(e)) from e
    if cfg.trainable.first_k_layers < 0:
        raise ConfigError("trainable.first_k_layers: must be >= 0")
    if not cfg.trainable.layers and not 0 <= cfg.trainable.skip_first_layers < max(cfg.trainable.first_k_layers, 1):
        raise ConfigError(f"trainable.skip_first_layers: must be in [0, first_k_layers) = [0, "
                          f"{cfg.trainable.first_k_layers}), got {cfg.trainable.skip_first_layers}")
    if cfg.trainable.skip_first_layers < 0:  # with trainable.layers, the model's layer count bounds it
        raise ConfigError(f"trainable.skip_first_layers: must be >= 0, got {cfg.trainable.skip_first_layers}")
    if not 0.0 < cfg.erase.esd_patch_fraction <= 1.0:
        raise ConfigError("erase.esd_patch_fraction: must be in (0, 1]")
    if cfg.world.grid_side < 4:
        raise ConfigError(f"world.grid_side: must be >= 4, got {cfg.world.grid_side}")
    if not 0.0 <= cfg.world.uncond_prob < 1.0:
        raise ConfigError(f"world.uncond_prob: must be in [0, 1), got {cfg.world.uncond_prob}")
    if cfg.world.hidden_size % cfg.world.num_heads:
        raise ConfigError(f"world.hidden_size ({cfg.world.hidden_size}) must be divisible by world.num_heads "
                          f"({cfg.world.num_heads})")
    for key in ("preserve.per_step", "preserve.refresh_every", "trainable.lora_rank"):
        if get_key(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_key(cfg, key)}")
    if cfg.preserve.weight < 0 or cfg.preserve.probe_every < 0 or cfg.preserve.drift_power < 0:
        raise ConfigError("preserve.weight, preserve.probe_every and preserve.drift_power must be >= 0")
    if not 0.0 < cfg.preserve.nullspace_energy < 1.0:
        raise ConfigError(f"preserve.nullspace_energy: must be in (0, 1), got {cfg.preserve.nullspace_energy}")
    if cfg.preserve.surrogates < 0:
        raise ConfigError(f"preserve.surrogates: must be >= 0, got {cfg.preserve.surrogates}")
    if cfg.preserve.surrogates and not (cfg.preserve.weight > 0 or cfg.preserve.nullspace):
        raise ConfigError("preserve.surrogates: anchors are used only by preserve.weight > 0 or preserve.nullspace; "
                          "turn one on or leave preserve.surrogates at 0")
    if (cfg.preserve.weight > 0 or cfg.preserve.nullspace) and not (
            cfg.preserve.prompts or cfg.preserve.prompts_file or cfg.preserve.surrogates):
        raise ConfigError("preserve.prompts: preserve.weight > 0 or preserve.nullspace needs anchor prompts "
                          "(preserve.prompts, preserve.prompts_file or preserve.surrogates)")
    if cfg.preserve.probe_every and not cfg.preserve.probe_prompts:
        raise ConfigError("preserve.probe_prompts: preserve.probe_every > 0 needs probe prompts")
    if not cfg.preserve.branches:
        raise ConfigError("preserve.branches: name at least one of guided, uncond, cond")
    if cfg.erase.method == "svare" and cfg.erase.reference_prompt == "unconditional":
        raise ConfigError("erase.reference_prompt: unconditional applies to the guided targets of ear/esd; "
                          "S-VARE trains toward the surrogate's tokens")
    if cfg.erase.window_prefix == "cached" and cfg.model.family != "janus":
        raise ConfigError(f"erase.window_prefix: cached is for next-token models (model.family=janus); "
                          f"a {cfg.model.family} model predicts whole scales (use window_prefix=recompute)")
    if cfg.erase.window_prefix == "cached" and cfg.erase.teacher_guidance_weight > 0 and cfg.erase.method == "ear":
        raise ConfigError("erase.window_prefix: cached keeps the conditional branch's keys and values only; with "
                          "erase.teacher_guidance_weight > 0 the student's unconditional branch is combined too "
                          "(use window_prefix=recompute)")
    if cfg.erase.method == "svare" and cfg.erase.rollout_from == "target":
        raise ConfigError("erase.rollout_from: target with erase.method=svare would train the student toward the "
                          "concept's own image tokens; S-VARE needs the surrogate's rollouts (rollout_from=surrogate)")
    for name, ov in cfg.erase.concepts.items():
        if ov.window_len is not None and ov.window_len < 1:
            raise ConfigError(f"erase.concepts.{name}.window_len: must be >= 1, got {ov.window_len}")
        if ov.loss_threshold is not None and ov.loss_threshold < 0:
            raise ConfigError(f"erase.concepts.{name}.loss_threshold: must be >= 0")
    _validate_slurm(cfg.slurm)
    _validate_numbers(cfg)
    _validate_words(cfg)


# key -> (low, high, low included, high included): a float outside means nothing (None: no bound). Every float
# setting is also checked to be finite (``_validate_numbers``).
FLOAT_RANGES = {
    "rollout.guidance_weight": (0.0, 1000.0, True, True),
    "rollout.temperature": (0.0, 100.0, False, True),
    "trainable.lora_alpha": (0.0, None, False, True),
    "erase.erase_guidance": (0.0, 1000.0, True, True),
    "erase.loss_threshold": (0.0, None, True, True),
    "erase.teacher_guidance_weight": (0.0, 1000.0, True, True),
    "erase.svare_bit_error_share": (0.0, 1.0, False, True),
    "erase.svare_code_distance": (0.0, None, True, True),
    "erase.svare_label_prob_max": (0.0, 1.0, False, True),
    "erase.svare_preserve_weight": (0.0, None, True, True),
    "erase.esd_patch_fraction": (0.0, 1.0, False, True),
    "optim.lr": (0.0, 1.0, False, True),
    "optim.weight_decay": (0.0, None, True, True),
    "data.ecg.llm_temperature": (0.0, 2.0, True, True),
    "data.ecg.llm_backoff_s": (0.0, None, True, True),
    "data.ecg.llm_requests_per_minute": (0.0, None, False, True),
    "data.ecg.llm_timeout_s": (0.0, None, False, True),
    "data.vf.threshold": (0.0, 1.0, True, True),
    "preserve.weight": (0.0, None, True, True),
    "preserve.drift_power": (0.0, None, True, True),
    "preserve.nullspace_energy": (0.0, 1.0, False, False),
    "world.lr": (0.0, 1.0, False, True),
    "world.uncond_prob": (0.0, 1.0, True, False),
    "world.target_accuracy": (0.0, 1.0, True, True),
    "world.min_accuracy": (0.0, 1.0, True, True),
    "world.guidance_weight": (0.0, 1000.0, True, True),
    "eval.classifier.threshold": (0.0, 1.0, True, True),
    "eval.attack.inversion_lr": (0.0, 10.0, False, True),
}
# integer settings that may be 0 but never negative (the >= 1 ones are in ``validate``)
NON_NEGATIVE_INTS = ["rollout.top_k", "data.num_workers", "data.ecg.num_pairs", "data.ecg.llm_max_retries",
                     "data.ecg.llm_max_requests", "train.checkpoint_every", "train.max_nonfinite_steps",
                     "preserve.probe_every", "world.warmup_steps", "eval.grid_prompts"]
POSITIVE_INTS = ["data.shuffle_buffer", "dist.teacher_ranks", "dist.timeout_s"]
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _interval(low, high, low_in, high_in) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _check_float(key: str, value, bounds=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if bounds is None:
        return
    low, high, low_in, high_in = bounds
    ok = (value >= low if low_in else value > low) and (high is None or (value <= high if high_in else value < high))
    if not ok:
        raise ConfigError(f"{key}: must be {_interval(*bounds)}, got {value:g}")


def _float_keys(section: Any, prefix: str):
    """(key, value) of every float-valued setting under ``section`` (sections and per-concept overrides walked)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, key + ".")
        elif isinstance(value, dict):
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    yield from _float_keys(item, f"{key}.{name}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, float) for v in value):
            for i, v in enumerate(value):
                yield f"{key}[{i}]", v


def _validate_numbers(cfg: Any) -> None:
    """Every float finite and in its range; counts not negative (``FLOAT_RANGES``, ``NON_NEGATIVE_INTS``)."""
    for key, value in _float_keys(cfg, ""):
        _check_float(key, value, FLOAT_RANGES.get(key))
    for name, ov in cfg.erase.concepts.items():
        for field_name in ("loss_threshold", "erase_guidance"):
            value = getattr(ov, field_name)
            if value is not None:
                _check_float(f"erase.concepts.{name}.{field_name}", value, FLOAT_RANGES[f"erase.{field_name}"])
    for i, beta in enumerate(cfg.optim.betas):
        _check_float(f"optim.betas[{i}]", beta, (0.0, 1.0, True, False))
    for key in NON_NEGATIVE_INTS:
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_key(cfg, key)}")
    for key in POSITIVE_INTS:
        if get_key(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_key(cfg, key)}")


def _validate_words(cfg: Any) -> None:
    """Names that cannot be empty, and a device torch knows."""
    if not cfg.erase.concept.strip():
        raise ConfigError("erase.concept: empty; name the concept to erase, e.g. erase.concept=church")
    if not str(cfg.train.out_dir).strip():
        raise ConfigError("train.out_dir: empty; name the run directory, e.g. train.out_dir=runs/church")
    if not str(cfg.model.path).strip():
        raise ConfigError("model.path: empty; name a model directory or a preset (tiny, janus-pro-1b, ...)")
    if not DEVICE.match(str(cfg.model.device)):
        raise ConfigError(f"model.device: {cfg.model.device!r} is not one of auto, cpu, cuda, cuda:N (N: a GPU's "
                          "index), mps")


def _validate_choices(section: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        if typing.get_origin(tp) is Literal:
            check_choice(value, tp, prefix + f.name)
        elif dataclasses.is_dataclass(value):
            _validate_choices(value, f"{prefix}{f.name}.")


def _validate_slurm(slurm: Any) -> None:
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
    """The value at ``section.key`` (dicts and dataclasses alike)."""
    obj = cfg
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj




def _check_adversarial(cfg: Any) -> None:
    """Adversarial erasure attacks the student in the training process itself: what that needs."""
    a = cfg.erase.adversarial
    if a.every < 0:
        raise ConfigError(f"erase.adversarial.every: must be >= 0 (0: off), got {a.every}")
    if not a.every:
        return
    if not a.lr > 0:
        raise ConfigError(f"erase.adversarial.lr: must be > 0, got {a.lr}")
    if a.template.count("{}") != 1:
        raise ConfigError(f"erase.adversarial.template: {a.template!r} must hold one '{{}}' for the searched tokens")
    if cfg.model.family != "janus":
        raise ConfigError(f"erase.adversarial.every: the prompt search supports model.family=janus only, not "
                          f"{cfg.model.family}")
    if cfg.dist.teacher_placement != "colocated":
        raise ConfigError(f"erase.adversarial.every: the attacks need the teacher on the student's rank "
                          f"(dist.teacher_placement=colocated, not {cfg.dist.teacher_placement})")
    if "zero3" in str(cfg.dist.deepspeed_config):
        raise ConfigError(f"erase.adversarial.every: the attacks read the whole student; ZeRO-3 "
                          f"({cfg.dist.deepspeed_config}) partitions it: use ZeRO-1 or 2")
