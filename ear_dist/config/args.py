"""The config flags every job command takes: ``--recipe NAME``, ``--config FILE|EXAMPLE`` and ``--set KEY=VALUE``."""

from __future__ import annotations

import argparse
from typing import Optional

from ear_dist.config.loading import load_config
from ear_dist.config.schema import Config


def add_config_args(p: argparse.ArgumentParser) -> None:
    """Add ``--recipe``, ``--config`` (each repeatable; later wins) and ``--set`` (repeatable) to a command's parser.

    Precedence, lowest first: the defaults, the recipes, the config files, the ``--set`` overrides.
    """
    p.add_argument("--recipe", action="append", default=[], metavar="NAME",
                   help="a packaged method recipe applied over the defaults, under --config and --set "
                        "(see `ear-dist config list`); repeatable, later wins")
    p.add_argument("--config", action="append", default=[], metavar="FILE|NAME",
                   help="YAML/JSON config, or a packaged example by name (see `ear-dist config list`); "
                        "repeatable, later wins")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key, e.g. --set erase.window_len=24 (repeatable)",
    )


def config_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> Config:
    """The config of a parsed command line: ``base``, the ``--recipe``s, the ``--config`` files, then ``--set``."""
    return load_config(files=args.config, overrides=args.overrides, base=base, recipes=getattr(args, "recipe", []))
