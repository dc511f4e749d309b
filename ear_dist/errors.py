"""The project's error classes and the exit code each one ends a command with.

Every error a user can act on derives from one of two classes, so the command line
shows it as one line and ends with its documented exit code:

- ``InputError`` (exit 2): bad config or input: a key, a file, a row, a shard, a
  checkpoint or a model directory that cannot be used as given;
- ``RunFailure`` (exit 1): the run itself failed: a rank that died, a disk that filled
  up; its subclass for a run that went non-finite (too many non-finite losses, an update
  that left the weights non-finite, a delta that is not finite) ends with exit 3.

Exit 75 (preempted: a checkpoint was written, run again to resume) is not an error;
``ear_dist.slurm.preempt`` owns it. Any other exception is a bug and keeps its
traceback. The concrete classes (``ConfigError``, ``ShardError``, ...) live beside the
code that raises them and also derive from the builtin they always were
(``ValueError``, ``RuntimeError``), so existing ``except`` clauses still catch them.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

EXIT_RUN_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75


class EarDistError(Exception):
    """An error whose message alone tells the user what went wrong and where."""

    exit_code = EXIT_RUN_FAILURE
    kind = "error"  # the word after "ear-dist: " on stderr


class InputError(EarDistError):
    """Bad config or input (exit 2): the message names the key, file, row, field or sample."""

    exit_code = EXIT_BAD_INPUT


class RunFailure(EarDistError):
    """The run failed while it ran (exit 1): the message says what happened and what to do."""

    exit_code = EXIT_RUN_FAILURE


class StorageError(RunFailure, OSError):
    """A write that did not complete (disk full, file size limit, permissions); nothing was left half-written."""


def storage_error(path, error: Exception, what: str = "write") -> StorageError:
    """A ``StorageError`` naming ``path`` and the OS's reason (errno name included: ENOSPC, EFBIG, ...).

    ``error``: the OSError, or a library's error that wraps one in its message (safetensors).
    """
    import errno
    import re

    number = getattr(error, "errno", None)
    if number is None:  # "I/O error: File too large (os error 27)"
        found = re.search(r"os error (\d+)", str(error))
        number = int(found.group(1)) if found else None
    code = errno.errorcode.get(number or 0, "")
    reason = getattr(error, "strerror", None) or (os.strerror(number) if number else str(error))
    hint = " (disk full or a file size limit)" if number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
    return StorageError(f"{path}: cannot {what}: {reason}{f' [{code}]' if code else ''}{hint}; "
                        "nothing was left half-written")


def report_error(error: BaseException, debug: bool = False) -> None:
    """One line on stderr (the traceback first with ``debug``), naming the rank in a multi-rank job."""
    if debug:
        traceback.print_exception(error)
    kind = getattr(error, "kind", "error")
    world = os.environ.get("WORLD_SIZE", "1")
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""
    text = re.sub(r"\s*\n\s*", " ", str(error).strip())  # one line, whatever a library's message looked like
    print(f"ear-dist: {kind}{where}: {text}", file=sys.stderr, flush=True)
