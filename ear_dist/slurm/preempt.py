"""Preemption: a signal asks the run to stop at a safe point; the job is then requeued.

Slurm sends USR1 (``#SBATCH --signal=B:USR1@N``) some seconds before the time limit, or
SIGTERM when it preempts or cancels. The handler only sets a flag: the training loop
checks ``handler.requested`` between steps, writes a checkpoint, and exits with
``EXIT_PREEMPTED``. Whoever owns the job then requeues it: the sbatch templates do it in
the batch script; a process that runs alone in its job can call ``handler.requeue()``.

    handler = PreemptionHandler().install()
    for step in steps:
        train_one_step()
        if handler.requested:
            save_checkpoint()
            sys.exit(handler.exit_code)

Exit codes (``ear_dist.errors``): 0 done; 1 the run failed; 2 bad config or input;
75 (EX_TEMPFAIL) stopped on purpose after a checkpoint, run again to resume; 130
(128 + SIGINT) stopped by Ctrl-C after a checkpoint, likewise. With ``abort_on_repeat``
a second signal does not wait for the step to end: it raises :class:`Interrupted`
(exit 128 + the signal's number) where the run is, and the rerun resumes from the
last checkpoint written before.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import Optional

from ear_dist.errors import EXIT_PREEMPTED, RunFailure

EXIT_OK = 0

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionError(RunFailure, RuntimeError):
    """The job cannot be requeued; the message says why."""


class Interrupted(RunFailure):
    """A second stop signal: the run ended where it was, without a checkpoint (exit 128 + the signal)."""

    def __init__(self, signum: int):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by a second {name} before the step ended; nothing of that step was saved: "
                         "run the same command to resume from the last checkpoint")
        self.exit_code = 128 + signum


def restart_count(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many times Slurm has restarted this job (SLURM_RESTART_COUNT; 0 on the first run)."""
    environ = os.environ if environ is None else environ
    value = environ.get("SLURM_RESTART_COUNT", "0") or "0"
    return int(value) if value.isdigit() else 0


class PreemptionHandler:
    """Turns preemption signals into a flag the training loop polls.

    Attributes:
        requested: True once any of the signals arrived.
        signal_name: the first signal that arrived ("SIGUSR1", "SIGTERM"), or None.
        received_at: time.time() of that signal, or None.
    """

    def __init__(self, signals=DEFAULT_SIGNALS, abort_on_repeat: bool = False):
        self.signals = tuple(signals)
        self.abort_on_repeat = abort_on_repeat
        self.requested = False
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only, as Python requires); returns self."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the loop stops at a step boundary, where a checkpoint is consistent.
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.time()
        elif self.abort_on_repeat:
            raise Interrupted(signum)

    @property
    def exit_code(self) -> int:
        """After a signal (run again to resume): 130 for SIGINT (Ctrl-C), else EXIT_PREEMPTED; else EXIT_OK."""
        if not self.requested:
            return EXIT_OK
        return 128 + signal.SIGINT if self.signal_name == "SIGINT" else EXIT_PREEMPTED

    def requeue(self, environ: Optional[Mapping[str, str]] = None) -> str:
        """Requeue this Slurm job with ``scontrol requeue``; returns the job id.

        Call it from one process only (rank 0), after the checkpoint is written: Slurm
        ends the running job and starts it again with SLURM_RESTART_COUNT one higher.
        Raises PreemptionError when not under Slurm or when scontrol refuses (e.g. a job
        submitted with --no-requeue).
        """
        environ = os.environ if environ is None else environ
        job_id = environ.get("SLURM_JOB_ID")
        if not job_id:
            raise PreemptionError("cannot requeue: not running in a Slurm job (SLURM_JOB_ID is unset); "
                                  "start the run again by hand to resume from its last checkpoint")
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            raise PreemptionError(f"cannot requeue Slurm job {job_id}: scontrol is not on PATH")
        result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PreemptionError(f"scontrol requeue {job_id} failed with exit code {result.returncode}: "
                                  f"{(result.stderr or result.stdout).strip()}")
        return job_id
