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
Logging is configured here, once (``ear_dist.telemetry.logs``). A process that joined a
process group (every rank of a launched job) ends through ``finish_job``
(``ear_dist.distributed.finish``): the ranks agree the job finished, then each leaves
with its code without the interpreter teardown that could abort it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from ear_dist.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILURE, EarDistError, report_error

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program Ctrl-C ended
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell tool whose reader closed the pipe

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program Ctrl-C ended

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
    "ear_dist.many.commands",
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
    from ear_dist.launch import HostlistError, LaunchError

    return LaunchError, HostlistError


def main(argv: list[str] | None = None, leave_process: bool = False) -> int:
    """Run one command; returns its exit code (see the module docstring).

    ``leave_process`` (the ``ear-dist`` program, ``run``): a command that joined a process
    group ends the process itself (``finish_job``), and a bug's traceback is printed
    here instead of raised. Called from Python, ``main`` returns, and raises a bug.
    """
    from ear_dist.distributed.finish import finish_job
    from ear_dist.telemetry.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(debug=args.debug)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    code = EXIT_RUN_FAILURE
    try:
        code = int(args.func(args) or 0)
    except EarDistError as e:
        report_error(e, args.debug)
        code = e.exit_code
    except _launch_errors() as e:  # launch/ stands alone, below the package: its errors are launch settings
        report_error(e, args.debug)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # Ctrl-C the command does not handle itself (a training run stops at a safe point)
        if args.debug:
            traceback.print_exception(e)
        # on a line of its own: a progress bar the signal cut short has not ended its line
        print(f"\near-dist: interrupted (SIGINT) during `ear-dist {args.command}`", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`ear-dist config show | head`): leave quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    except Exception:
        if not leave_process:
            raise
        traceback.print_exc()  # a bug keeps its traceback
    finally:
        code = finish_job(code, leave_process)
    return code


def run() -> None:
    """The ``ear-dist`` program (console script and ``python -m ear_dist``): run the command, exit with its code."""
    sys.exit(main(leave_process=True))


if __name__ == "__main__":
    run()
