"""How a command that joined a process group ends: the ranks agree it finished, then each leaves at once.

Interpreter exit is not safe for a rank. ``destroy_process_group`` drops the registry's
groups, but the group objects DeepSpeed and the runtime still reference live on, with
their gloo threads (four ``pt_gloo_runloop`` and two ``gloo_tcp_loop`` on each rank of a
2-rank ZeRO run, counted after the command returned and the group was destroyed).
Interpreter teardown then destroys them in whatever order it reaches them, and now and
then a ``std::thread`` is destroyed still joinable: the rank aborts (SIGABRT, "terminate
called without an active exception") after the job finished, and the launcher fails the
job. So the command line ends such a process with ``finish_job``, which runs no C++
destructor at all.

What it waits for first: the command returned, so its outputs are written (deltas,
summaries and run records are fsynced before their rename; metrics writers are closed).
A rank that failed does not wait: it leaves with its own code, its error already on
stderr, and the ranks waiting for it at the barrier fail in turn, so the job fails.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

from ear_dist.errors import EXIT_PREEMPTED, EXIT_RUN_FAILURE, RunFailure, report_error

# How long a rank waits at the end for the others: the main rank may still be writing a
# delta, or an eval report, after the last collective (dist.timeout_s bounds collectives).
FINISH_WAIT_S = 3600

ENDED_AS_MEANT = (0, EXIT_PREEMPTED)  # done, or preempted after a checkpoint (every rank, at the same step)
_finish_group = None  # a gloo group for the final barrier when the job's own backend is not gloo
_finish_wait = timedelta(seconds=FINISH_WAIT_S)


def prepare_finish(timeout_s: float) -> None:
    """Set up the final barrier once a process group of several ranks exists (collective: every rank calls it).

    A barrier on an NCCL group gives up after ``dist.timeout_s``; the final one runs on
    a gloo group (``monitored_barrier``), which waits ``max(timeout_s, FINISH_WAIT_S)``.
    """
    global _finish_group, _finish_wait
    import torch.distributed as dist

    _finish_wait = timedelta(seconds=max(timeout_s, FINISH_WAIT_S))
    if _finish_group is None and dist.get_backend() != "gloo":
        _finish_group = dist.new_group(backend="gloo", timeout=_finish_wait)


def finish_job(code: int, leave_process: bool) -> int:
    """End a command with exit code ``code`` on this rank; returns the code, or leaves the process.

    If a process group was joined: when ``code`` says the command ended as meant (0, or
    75: preempted after a checkpoint) and there are several ranks, wait until every rank
    got there (a barrier; one that fails turns ``code`` into 1, with its line on stderr),
    then destroy the process group. With ``leave_process`` (the ``ear-dist`` program, not
    a caller of ``cli.main``), flush the logs, stdout and stderr and leave with
    ``os._exit(code)``. A rank that failed skips the barrier, and the destroy (an NCCL
    group that lost a rank can hang in it) when it leaves the process.
    """
    global _finish_group
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return code
    if code in ENDED_AS_MEANT and dist.get_world_size() > 1 and not _every_rank_got_here(dist):
        code = EXIT_RUN_FAILURE
    if code in ENDED_AS_MEANT or not leave_process:
        dist.destroy_process_group()
        _finish_group = None
    if not leave_process:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced: nothing left to lose
            pass
    os._exit(code)


def _every_rank_got_here(dist) -> bool:
    """True once every rank reached the end; False (its line printed) when another rank failed or did not come."""
    try:
        dist.monitored_barrier(group=_finish_group, timeout=_finish_wait, wait_all_ranks=True)
    except RuntimeError as e:
        report_error(RunFailure(f"this rank finished, but another rank failed or did not reach the end of the job "
                                f"within {_finish_wait.total_seconds():.0f} s: {str(e).splitlines()[0][:300]}"))
        return False
    return True
