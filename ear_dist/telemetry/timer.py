"""Per-phase step timers: ``with timers.phase(TEACHER_ROLLOUT): ...``.

On a CUDA device the phases are timed with CUDA events on the current stream,
so the figures are GPU time between the phase's start and end, not the time the
host took to enqueue kernels; the one synchronisation happens in
:meth:`PhaseTimers.end_step`. On CPU they use ``time.perf_counter``.

A phase may be entered several times in a step (one student forward/backward
per window, for example): its times add up. Different phases may nest; the
inner one is then counted in both, so keep the standard phases disjoint.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

__all__ = [
    "DATA_WAIT",
    "TEACHER_ROLLOUT",
    "TEACHER_TARGETS",
    "STUDENT_FWD_BWD",
    "LOSS",
    "OPTIMIZER",
    "PHASES",
    "PhaseTimers",
    "StepTiming",
    "mean_timing",
]

DATA_WAIT = "data_wait"
TEACHER_ROLLOUT = "teacher_rollout"
TEACHER_TARGETS = "teacher_targets"
STUDENT_FWD_BWD = "student_fwd_bwd"
LOSS = "loss"
OPTIMIZER = "optimizer"
# in the order they happen in an erasure step
PHASES = (DATA_WAIT, TEACHER_ROLLOUT, TEACHER_TARGETS, STUDENT_FWD_BWD, LOSS, OPTIMIZER)


@dataclass
class StepTiming:
    """Seconds per phase in one step, the step's total, and how often each phase ran."""

    step_s: float
    phases: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def other_s(self) -> float:
        """Step time outside every phase (Python overhead, logging, untimed work)."""
        return self.step_s - sum(self.phases.values())

    def as_metrics(self, prefix: str = "time/") -> dict:
        """Milliseconds per phase and per step as a flat dict for the metrics writer."""
        out = {f"{prefix}{name}_ms": s * 1e3 for name, s in self.phases.items()}
        out[f"{prefix}step_ms"] = self.step_s * 1e3
        return out


class PhaseTimers:
    """Times named phases within steps on one device.

    ``device``: where the work runs; a CUDA device switches to CUDA events.
    ``clock``: the CPU clock in seconds (tests pass a fake one).
    """

    def __init__(self, device: Optional[torch.device | str] = None, clock: Callable[[], float] = time.perf_counter):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.device = device
        self.use_cuda = device.type == "cuda"
        self._step_open = False
        self._open: set[str] = set()
        # CPU: (name, seconds); CUDA: (name, start_event, end_event)
        self._records: list[tuple] = []
        self._step_start = None
        self._clock = clock

    def _now(self):
        if self.use_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return float(self._clock())

    @staticmethod
    def _elapsed_s(start, end) -> float:
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3  # CUDA events measure milliseconds

    def start_step(self) -> None:
        """Begin a step; phases entered from now on belong to it."""
        if self._step_open:
            raise RuntimeError("start_step() called twice without end_step()")
        self._records = []
        self._step_open = True
        self._step_start = self._now()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name`` (a constant such as TEACHER_ROLLOUT)."""
        if not self._step_open:
            raise RuntimeError(f"phase {name!r} entered outside a step: call start_step() first")
        if name in self._open:
            raise RuntimeError(f"phase {name!r} is already running: phases of one name cannot nest")
        self._open.add(name)
        start = self._now()
        try:
            yield
        finally:
            end = self._now()
            self._open.discard(name)
            self._records.append((name, start, end))

    def end_step(self) -> StepTiming:
        """End the step and return its timing (synchronises the CUDA device once)."""
        if not self._step_open:
            raise RuntimeError("end_step() called without start_step()")
        if self._open:
            raise RuntimeError(f"end_step() while phases are still running: {sorted(self._open)}")
        end = self._now()
        if self.use_cuda:
            end.synchronize()
        self._step_open = False
        timing = StepTiming(step_s=self._elapsed_s(self._step_start, end))
        for name, start, stop in self._records:
            timing.phases[name] = timing.phases.get(name, 0.0) + self._elapsed_s(start, stop)
            timing.calls[name] = timing.calls.get(name, 0) + 1
        self._records = []
        return timing


def mean_timing(timings: Sequence[StepTiming]) -> StepTiming:
    """The mean over steps (e.g. after dropping warm-up steps); a phase missing in a step counts 0."""
    if not timings:
        raise ValueError("mean_timing: no steps given")
    n = len(timings)
    names: list[str] = []
    for t in timings:
        names += [k for k in t.phases if k not in names]
    return StepTiming(
        step_s=sum(t.step_s for t in timings) / n,
        phases={k: sum(t.phases.get(k, 0.0) for t in timings) / n for k in names},
        calls={k: sum(t.calls.get(k, 0) for t in timings) for k in names},
    )
