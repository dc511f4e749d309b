"""From files and ``--set`` overrides to a checked ``Config``.

Files are merged first, then ``--set section.key=value`` overrides from the command
line. Unknown keys, values of the wrong type and values outside a ``Literal``'s
choices are errors that name the full dotted key; ``validate`` then checks what
types alone do not (ranges, relations between keys).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ear_dist.config.layers import check_layers_spec
from ear_dist.config.schema import PRESET_FAMILIES, Config, SlurmConfig
from ear_dist.errors import InputError

EXAMPLES_DIR = Path(__file__).parent / "examples"
RECIPES_DIR = Path(__file__).parent / "recipes"
# trainable.layers replaces first_k_layers; a later source that sets it (and not layers) clears layers
LEGACY_LAYER_KEYS = ("first_k_layers",)


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


def recipe_files() -> dict[str, Path]:
    """The recipes shipped in the package, by name (``preserving`` -> .../recipes/preserving.yaml)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"), key=lambda p: p.stem)}


def read_recipe(name: str, _chain: tuple = ()) -> dict:
    """A recipe's config fragment, the recipes it ``extends`` merged first (in order, then its own keys)."""
    recipes = recipe_files()
    if name not in recipes:
        raise ConfigError(f"--recipe {name}: no such recipe (recipes: {', '.join(recipes)}; see `ear-dist config list`)")
    if name in _chain:
        raise ConfigError(f"{recipes[name]}: extends itself through {' -> '.join((*_chain, name))}")
    own = read_file(recipes[name])
    parents = own.pop("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    data: dict = {}
    for parent in parents:
        data = _merge_source(data, read_recipe(parent, (*_chain, name)))
    data = _merge_source(data, own)
    try:
        from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{recipes[name]}: {e}") from e
    return data


def recipe_overrides(name: str) -> list[str]:
    """A recipe as ``--set`` overrides (``key=JSON value``), for code that composes override lists."""
    def flat(node: dict, prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}={json.dumps(v)}"]
        return out

    return flat(read_recipe(name), "")


def resolve_config_file(path: Union[str, Path]) -> Path:
    """``path`` when it is a file; a bare example name (``church``) when no such file exists."""
    p = Path(path)
    if p.is_file():
        return p
    examples = example_configs()
    if str(path) in examples:
        return examples[str(path)]
    # a bare name was meant as an example: say which exist
    hint = f" (nor a packaged example: {', '.join(examples)})" if len(p.parts) == 1 and not p.suffix else ""
    raise ConfigError(f"config file not found: {p}{hint}")


def read_file(path: Union[str, Path]) -> dict:
    """Read a YAML or JSON config file (or a packaged example by name) into a dict."""
    p = resolve_config_file(path)
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


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _merge_source(data: dict, over: dict) -> dict:
    """``over`` merged onto ``data``; setting trainable.first_k_layers without trainable.layers clears layers."""
    trainable = over.get("trainable")
    if isinstance(trainable, dict) and "layers" not in trainable and any(k in trainable for k in LEGACY_LAYER_KEYS):
        if isinstance(data.get("trainable"), dict):
            data = {**data, "trainable": {k: v for k, v in data["trainable"].items() if k != "layers"}}
    return _merge(data, over)


def _implied_family(data: dict) -> dict:
    """A model preset implies its family: model.family from model.path when only the path is given."""
    model = data.get("model")
    if not isinstance(model, dict) or "family" in model or model.get("path") not in PRESET_FAMILIES:
        return data
    return {**data, "model": {**model, "family": PRESET_FAMILIES[model["path"]]}}


def load_config(
    files: Optional[list] = None,
    overrides: Optional[list[str]] = None,
    base: Optional[dict] = None,
    recipes: Optional[list[str]] = None,
) -> Config:
    """Merge ``base``, then each recipe, then each file, then each ``key=value`` override, and validate.

    A later source wins key by key; a model preset in model.path implies model.family unless
    a source sets the family.
    """
    data: dict = dict(base or {})
    for name in recipes or []:
        data = _merge_source(data, read_recipe(name))
    for f in files or []:
        data = _merge_source(data, read_file(f))
    for o in overrides or []:
        data = _merge_source(data, parse_override(o))
    cfg = from_dict(Config, _implied_family(data))
    validate(cfg)
    return cfg


def config_yaml(cfg: Config) -> str:
    """The whole tree as YAML text; ``load_config`` of a file holding it gives ``cfg`` back."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the whole tree as YAML; ``load_config([path])`` reads it back equal."""
    Path(path).write_text(config_yaml(cfg), encoding="utf-8")
