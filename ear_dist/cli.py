"""``ear-dist <subcommand>``: one entry point; each area of the package registers its commands.

Every command that runs a job takes ``--config FILE`` (repeatable, YAML/JSON) and
``--set section.key=value`` overrides, which fill the one config tree in
``ear_dist.config`` (whose ``add_config_args`` the commands call). Areas add commands
by exposing ``register(subparsers)`` in a module listed in ``COMMAND_MODULES``; no
module imports this one back.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ear_dist.config import ConfigError

# Each module exposes register(subparsers) -> None.
COMMAND_MODULES = [
    "ear_dist.models.commands",
    "ear_dist.data.commands",
    "ear_dist.train.commands",
    "ear_dist.teacher.commands",
    "ear_dist.demo",
    "ear_dist.bench.commands",
    "ear_dist.slurm.commands",
    "ear_dist.world.commands",
    "ear_dist.config.commands",
    "ear_dist.eval.commands",
]


def package_version() -> str:
    """The installed distribution's version; the source tree's when ear-dist is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ear-dist")
    except PackageNotFoundError:
        from ear_dist import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ear-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"ear-dist: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"ear-dist: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
