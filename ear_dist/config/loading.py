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

from ear_dist.config.checks import ConfigError, check_choice, validate
from ear_dist.config.schema import PRESET_FAMILIES, Config

EXAMPLES_DIR = Path(__file__).parent / "examples"
RECIPES_DIR = Path(__file__).parent / "recipes"
# trainable.layers replaces first_k_layers; a later source that sets it (and not layers) clears layers
LEGACY_LAYER_KEYS = ("first_k_layers",)


# --------------------------------------------------------------------------- types


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
