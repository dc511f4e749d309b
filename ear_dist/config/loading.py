"""From files and ``--set`` overrides to a checked ``Config``.

Files are merged first, then ``--set section.key=value`` overrides from the command
line. Unknown keys, values of the wrong type and values outside a ``Literal``'s
choices are errors that name the full dotted key; ``validate`` then checks what
types alone do not (ranges, relations between keys).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ear_dist.config.schema import Config, SlurmConfig
from ear_dist.errors import InputError

EXAMPLES_DIR = Path(__file__).parent / "examples"


class ConfigError(InputError, ValueError):
    """A config value that cannot be used; the message names the dotted key."""


# --------------------------------------------------------------------------- types


def check_choice(value: Any, tp: Any, key: str) -> Any:
    """``value`` when it is one of the ``Literal`` type's values, else a ConfigError listing them."""
    choices = typing.get_args(tp)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return check_choice(value, tp, key)
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


# --------------------------------------------------------------------------- checks


def validate(cfg: Config) -> None:
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
        "world.threads", "eval.images_per_prompt", "eval.coco_size", "eval.world_prompts", "eval.classifier.top_k",
    ]
    for key in positives:
        if get_key(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_key(cfg, key)}")
    if not 0.0 < cfg.erase.svare_bit_error_share <= 1.0:
        raise ConfigError(f"erase.svare_bit_error_share: must be in (0, 1], got {cfg.erase.svare_bit_error_share}")
    if cfg.erase.svare_scales < 0:
        raise ConfigError(f"erase.svare_scales: must be >= 0, got {cfg.erase.svare_scales}")
    if cfg.erase.loss_threshold < 0:
        raise ConfigError(f"erase.loss_threshold: must be >= 0, got {cfg.erase.loss_threshold}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if cfg.trainable.first_k_layers < 0:
        raise ConfigError("trainable.first_k_layers: must be >= 0")
    if not 0 <= cfg.trainable.skip_first_layers < max(cfg.trainable.first_k_layers, 1):
        raise ConfigError(f"trainable.skip_first_layers: must be in [0, first_k_layers) = [0, "
                          f"{cfg.trainable.first_k_layers}), got {cfg.trainable.skip_first_layers}")
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


def _validate_numbers(cfg: Config) -> None:
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


def _validate_words(cfg: Config) -> None:
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
    """The value at ``section.key`` (dicts and dataclasses alike)."""
    obj = cfg
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- files


def example_configs() -> dict[str, Path]:
    """The example configs shipped in the package, by name (``church`` -> .../examples/church.yaml)."""
    return {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def example_description(path: Path) -> str:
    """The first comment line of an example config: what setting it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config_file(path: Union[str, Path]) -> Path:
    """``path`` when it is a file; a bare example name (``church``) when no such file exists."""
    from ear_dist.paths import check_input_file

    p = check_input_file(path, "--config")
    if p.is_file():
        return p
    examples = example_configs()
    if str(path) in examples:
        return examples[str(path)]
    # a bare name was meant as an example: say which exist
    hint = f" (nor a packaged example: {', '.join(examples)})" if len(p.parts) == 1 and not p.suffix else ""
    raise ConfigError(f"config file not found: {p}{hint}")


class DuplicateKey(ValueError):
    """A key given twice in one mapping of a config file (the later would silently win)."""


def _unique_json_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _unique_key_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping, naming it and its line."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: yaml's own error follows
                    repeated = False
                if repeated:
                    raise DuplicateKey(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (the later value "
                                       "would silently replace the earlier; keep one)")
                seen.add(key) if not isinstance(key, (list, dict)) else None
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_file(path: Union[str, Path]) -> dict:
    """Read a YAML or JSON config file (or a packaged example by name) into a dict."""
    p = resolve_config_file(path)
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_keys)
        else:
            import yaml

            data = yaml.load(text, Loader=_unique_key_loader())
    except DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
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


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


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


def config_yaml(cfg: Config) -> str:
    """The whole tree as YAML text; ``load_config`` of a file holding it gives ``cfg`` back."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the whole tree as YAML; ``load_config([path])`` reads it back equal."""
    Path(path).write_text(config_yaml(cfg), encoding="utf-8")
