"""Logging for every command, configured once by the command line.

All log records go to stderr (stdout carries only a command's result, e.g. the
summary JSON of ``ear-dist erase``), each prefixed with its rank::

    2026-11-25 10:02:03 [rank 1] WARNING ear_dist.data: skipping unreadable data: ...

Warnings that every rank would print alike are printed by rank 0 alone: Python
``warnings`` and the libraries' warnings (the same code runs on every rank), and
project records logged with ``extra={"shared": True}`` (those derived from inputs all
ranks read the same way: the config, the pairs, the run directory). What only one
rank sees (a shard it could not read, its own non-finite loss) and every ERROR keep
their rank prefix and are printed where they happen.

Third-party libraries log at WARNING and above; ``debug=True`` (``--debug``) shows
this package's DEBUG records too.
"""

from __future__ import annotations

import logging
import os
import sys

SHARED = "shared"  # the ``extra`` key of records that every rank logs alike
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
# libraries that log to stdout by default, or chat at INFO
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "transformers", "torch.distributed", "urllib3", "filelock")

_configured = False
_debug = False


def current_rank() -> int:
    """This process's rank as the launcher exported it (0 when not launched as several ranks)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _alike_on_every_rank(record: logging.LogRecord) -> bool:
    library = record.name.split(".")[0] in NOISY_LOGGERS or record.name == "py.warnings"
    return record.levelno < logging.ERROR and (library or getattr(record, SHARED, False))


class RankFilter(logging.Filter):
    """Stamps each record with the rank; drops records every rank logs alike on ranks other than 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        return record.rank == 0 or not _alike_on_every_rank(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced after set-up)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        return None


def configure_logging(debug: bool = False) -> None:
    """Send every log record to stderr with a rank prefix (idempotent: the first call wins)."""
    global _configured, _debug
    if _configured:
        return
    _configured, _debug = True, debug
    handler = _StderrHandler()
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("ear_dist").setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(True)
    route_library_logs()


class _RoutedLogger(logging.Logger):
    """A library's logger whose records always reach the configured handler, at WARNING unless debugging.

    DeepSpeed, as it is imported, gives its logger a handler on stdout, turns propagation
    off and sets INFO; made before that import, this logger keeps none of those changes.
    """

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 (logging's name)
        return None

    def setLevel(self, level) -> None:  # noqa: N802
        super().setLevel(logging.DEBUG if _debug else max(logging._checkLevel(level), logging.WARNING))

    @property
    def propagate(self) -> bool:
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        return None


def route_library_logs() -> None:
    """Route the noisy libraries' loggers through the configured handler, at WARNING unless debugging.

    Loggers not made yet are made as ``_RoutedLogger``; one a library made already (it was
    imported first) loses its own handlers. Does nothing when logging was not configured
    (a library user keeps their own set-up).
    """
    if not _configured:
        return
    for name in NOISY_LOGGERS:
        if name not in logging.Logger.manager.loggerDict:
            logging.setLoggerClass(_RoutedLogger)
            try:
                logging.getLogger(name)
            finally:
                logging.setLoggerClass(logging.Logger)
        quiet = logging.getLogger(name)
        quiet.handlers[:] = []
        quiet.propagate = True
        quiet.setLevel(logging.DEBUG if _debug else logging.WARNING)
