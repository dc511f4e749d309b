"""``ear-dist config show`` (the resolved tree with each key's help, the layers it trains on the model) and
``ear-dist config list`` (the recipes and the example configs)."""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any, Literal

from ear_dist.config.args import add_config_args, config_from_args
from ear_dist.config.layers import describe_layers, resolve_layers
from ear_dist.config.loading import example_configs, example_description, recipe_files
from ear_dist.config.schema import Config, field_help

WIDTH = 100


def register(sub) -> None:
    p = sub.add_parser("config", help="show the resolved config with help text; list the recipes and example configs")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True

    show = config_sub.add_parser(
        "show", help="print the resolved config as YAML, each key with its help and allowed values",
        description="Prints the config that --recipe, --config files and --set overrides resolve to, as YAML that "
        "--config reads back; comments give each key's meaning and, where fixed, its allowed values, and the "
        "layers trainable.* selects on model.path (a preset or a local model directory).",
    )
    add_config_args(show)
    show.add_argument("--defaults", action="store_true", help="show the defaults; ignore --recipe, --config and --set")
    show.set_defaults(func=run_show)

    ls = config_sub.add_parser("list", help="the recipes (use: --recipe NAME) and example configs (use: --config NAME) "
                                            "shipped with ear-dist")
    ls.set_defaults(func=run_list)


def run_show(args) -> int:
    if args.defaults:
        cfg, origin = Config(), "defaults"
    else:
        cfg = config_from_args(args)
        given = [*(f"--recipe {r}" for r in args.recipe), *args.config, *(f"--set {o}" for o in args.overrides)]
        origin = "resolved from " + ", ".join(given) if given else "defaults"
    print(f"# ear-dist config ({origin})".replace("\n", "\\n"))  # an override's newline must not end the comment
    print(annotated_yaml(cfg))
    print(trained_layers_comment(cfg))
    return 0


def trained_layers_comment(cfg: Config) -> str:
    """A comment naming the layers and modules trainable.* selects on model.path (read without its weights)."""
    from ear_dist.models.family import layer_count

    t = cfg.trainable
    if t.patterns:
        return f"# trained: the parameters matching trainable.patterns {t.patterns} on {cfg.model.path}"
    n = layer_count(cfg.model.path, cfg.model.family)
    spec = t.layers or f"first_k_layers {t.first_k_layers}"
    if t.skip_first_layers:
        spec += f", skip_first_layers {t.skip_first_layers}"
    if n is None:
        return f"# trained: {t.modules} modules of the layers {spec!r} selects (model.path {cfg.model.path!r} " \
               "is not a preset or a readable model directory, so its layer count is unknown)"
    if not t.layers and t.first_k_layers > n:
        return f"# trained: nothing; trainable.first_k_layers {t.first_k_layers} > the {n} layers of {cfg.model.path}"
    layers = resolve_layers(t.layers, n, t.first_k_layers, t.skip_first_layers)
    return f"# trained on {cfg.model.path} ({cfg.model.family}, {n} layers): {t.modules} modules of " \
           f"{describe_layers(layers, n)} ({spec})"


def run_list(args) -> int:
    recipes, examples = recipe_files(), example_configs()
    width = max(map(len, [*recipes, *examples]), default=0)
    print("recipes (methods and settings, any model; use: --recipe NAME, e.g. "
          "`ear-dist config show --recipe preserving --set model.path=janus-pro-7b`):")
    for name, path in recipes.items():
        print(f"  {name:{width}s}  {example_description(path)}")
    print("\nexample configs (jobs; use: --config NAME, e.g. `ear-dist config show --config church`):")
    for name, path in examples.items():
        print(f"  {name:{width}s}  {example_description(path)}")
    return 0


def annotated_yaml(cfg: Config) -> str:
    """The tree as YAML with help comments; ``yaml.safe_load`` of it gives ``cfg.to_dict()``."""
    return "\n".join(_section_lines(cfg, cfg.to_dict(), 0))


def _comment(text: str, pad: str) -> list[str]:
    return [f"{pad}# {line}" for line in textwrap.wrap(text, WIDTH - len(pad) - 2)]


def _section_lines(section: Any, data: dict, depth: int) -> list[str]:
    import yaml

    pad = "  " * depth
    hints = typing.get_type_hints(type(section))
    lines: list[str] = []
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            if depth == 0 and lines:
                lines.append("")
            lines += _comment(_first_paragraph(type(value).__doc__), pad)
            lines.append(f"{pad}{f.name}:")
            lines += _section_lines(value, data[f.name], depth + 1)
            continue
        lines += _comment(field_help(f), pad)
        # one line in flow style (lists and mappings too); block style only for multi-line strings
        flow = yaml.safe_dump(data[f.name], default_flow_style=True, sort_keys=False, width=10**6)
        flow = flow.removesuffix("\n...\n").rstrip("\n")
        if "\n" in flow:
            block = yaml.safe_dump({f.name: data[f.name]}, default_flow_style=False, sort_keys=False)
            lines += [pad + line for line in block.rstrip("\n").split("\n")]
            continue
        line = f"{pad}{f.name}: {flow}"
        if typing.get_origin(tp) is Literal:
            line += "  # one of: " + ", ".join(map(str, typing.get_args(tp)))
        lines.append(line)
    return lines


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())
