"""``ear-dist <subcommand>``: one entry point; each area of the package registers its commands.

Every command that runs a job takes ``--config FILE`` (repeatable, YAML/JSON) and
``--set section.key=value`` overrides, which fill the one config tree in
``ear_dist.config`` (whose ``add_config_args`` the commands call). Areas add commands
by exposing ``register(subparsers)`` in a module listed in ``COMMAND_MODULES``; no
module imports this one back.

Failures: a project error (``ear_dist.errors``) is one line on stderr and its exit
code (2 bad config or input, 1 the run failed, 3 it went non-finite; 75 is a preempted run that
checkpointed, 130 one stopped by Ctrl-C);
``--debug`` adds its traceback. Any other exception is a bug and keeps its traceback.
Logging is configured here, once (``ear_dist.telemetry.logs``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import traceback

from ear_dist.config import ConfigError
from ear_dist.errors import EXIT_BAD_INPUT, EarDistError

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


def _add_global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--debug`` and ``--local_rank`` on the top parser and on every (sub)command.

    Sub-parsers default to SUPPRESS so that a flag given before the command is kept.
    The deepspeed launcher appends ``--local_rank=N`` right after the module name, i.e.
    before the command; torch's legacy launcher spells it ``--local-rank``.
    """
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, and DEBUG logs",
                        **({"default": False} if top else default))
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, metavar="N",
                        help="set by the deepspeed launcher (LOCAL_RANK in the environment wins)",
                        **({"default": None} if top else default))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_global_flags(child, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ear-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_global_flags(parser, top=True)
    return parser


def _launch_errors() -> tuple:
    from launch import HostlistError, LaunchError

    return LaunchError, HostlistError


def _report(error: BaseException, debug: bool) -> None:
    """One line on stderr (the traceback first with ``--debug``), naming the rank in a multi-rank job."""
    if debug:
        traceback.print_exception(error)
    kind = "config error" if isinstance(error, ConfigError) else "error"
    world = os.environ.get("WORLD_SIZE", "1")
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""
    text = re.sub(r"\s*\n\s*", " ", str(error).strip())  # one line, whatever a library's message looked like
    print(f"ear-dist: {kind}{where}: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see the module docstring)."""
    from ear_dist.telemetry.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(debug=args.debug)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        rc = args.func(args)
    except EarDistError as e:
        _report(e, args.debug)
        return e.exit_code
    except _launch_errors() as e:  # launch/ stands alone, below the package: its errors are launch settings
        _report(e, args.debug)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C in a command that does not stop at a safe point of its own
        print("ear-dist: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        _release_process_group()
    return int(rc or 0)


def _release_process_group() -> None:
    """Tear down the process group a command joined, while the interpreter is whole: left to exit, the
    gloo group's threads were sometimes destroyed still joinable, and a finished rank aborted (exit -6)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
