"""What every benchmark prints about where and how it ran, and how it summarises repeats.

A figure is the median over its repeats, with the min and max beside it (``Stat``). A
ratio of two loops is taken per repeat of interleaved runs (machine noise hits both
alike), then summarised the same way. ``run_header`` names the machine, its load when
the run started, the date, the versions and the exact command, so a newcomer can rerun
a figure and see whether the machine was busy when it was taken.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Stat:
    """Median, min and max of one figure over ``n`` repeats."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        values = list(values)
        if not values:
            raise ValueError("Stat.of: no values")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> "Stat":
        """The same figure in other units, e.g. ``scaled(1e3)`` for seconds -> milliseconds."""
        return Stat(self.median * factor, self.min * factor, self.max * factor, self.n)

    def fmt(self, spec: str = ".2f", unit: str = "") -> str:
        """``12.30x (11.02-13.10)``: the median, then the range over the repeats."""
        if self.n == 1:
            return f"{self.median:{spec}}{unit} (1 run)"
        return f"{self.median:{spec}}{unit} ({self.min:{spec}}-{self.max:{spec}})"

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "repeats": self.n}


def ratio_stat(baseline_s: Sequence[float], candidate_s: Sequence[float]) -> Stat:
    """``baseline / candidate`` per repeat (times of interleaved runs): how many times faster the candidate is."""
    if len(baseline_s) != len(candidate_s):
        raise ValueError(f"ratio_stat: {len(baseline_s)} baseline and {len(candidate_s)} candidate repeats")
    return Stat.of([b / c for b, c in zip(baseline_s, candidate_s)])


def rate_stat(seconds: Sequence[float], amount: float) -> Stat:
    """``amount / seconds`` per repeat (e.g. tokens per second)."""
    return Stat.of([amount / s for s in seconds])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """The CPU, its cores and load average, and the GPU when torch sees one."""
    text = f"machine: {_cpu_name()}, {os.cpu_count()} cores"
    try:
        load = os.getloadavg()
        text += f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            text += f"; GPU: {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return text


def busy_warning() -> str:
    """A warning line when the machine was busy at the start (load above half its cores), else ''."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if load > cores / 2:
        return (f"# WARNING: load average {load:.1f} on {cores} cores: other jobs share this machine, so timings "
                "and their ratios are not the quiet-machine figures")
    return ""


def command_line() -> str:
    """The command that ran, as a newcomer would type it (with OMP_NUM_THREADS when set)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + "python " + shlex.join(sys.argv)


def run_header(name: str) -> list[str]:
    """Lines that say which benchmark ran where, when, with what, and how to run it again."""
    import torch
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {name}  {now}", f"# {machine_line()}",
             f"# torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{torch.get_num_threads()} intra-op threads",
             f"# command: {command_line()}"]
    warning = busy_warning()
    return lines + ([warning] if warning else [])
