"""The tables ``ear-dist bench`` prints: time per phase, throughput, MFU, and ratios.

A phase table has one row per phase (ms/step, share of the step, tokens/s for
the tokens that phase handles, MFU from the FLOPs that phase does), a row for
the time outside every phase, and a row for the whole step. Ratio rows compare
two measurements from the same run ("ours vs the official loop").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ear_dist.telemetry.flops import mfu
from ear_dist.telemetry.memory import MemoryStats
from ear_dist.telemetry.nvml import NvmlStepStats
from ear_dist.telemetry.timer import StepTiming

__all__ = ["PhaseRow", "Ratio", "phase_rows", "phase_table", "ratio_table", "device_line", "resource_lines"]

NA = "n/a"
NONE = "-"


@dataclass(frozen=True)
class PhaseRow:
    """One phase: seconds per step, and optionally the tokens and FLOPs it handles per step."""

    phase: str
    seconds_per_step: float
    tokens_per_step: Optional[float] = None
    flops_per_step: Optional[float] = None


@dataclass(frozen=True)
class Ratio:
    """A comparison of two measurements of the same thing, e.g. step time ours vs baseline.

    ``higher_is_better``: False for times (ratio = baseline / candidate), True
    for throughputs (ratio = candidate / baseline); either way a ratio above 1
    means the candidate is better.
    """

    label: str
    baseline: float
    candidate: float
    unit: str = "ms"
    higher_is_better: bool = False

    @property
    def ratio(self) -> Optional[float]:
        num, den = (self.candidate, self.baseline) if self.higher_is_better else (self.baseline, self.candidate)
        return num / den if den else None


def phase_rows(
    timing: StepTiming,
    tokens_per_step: Optional[Mapping[str, float]] = None,
    flops_per_step: Optional[Mapping[str, float]] = None,
) -> list[PhaseRow]:
    """Rows from a (mean) :class:`StepTiming`, in the order the phases ran."""
    tokens_per_step = tokens_per_step or {}
    flops_per_step = flops_per_step or {}
    return [
        PhaseRow(name, seconds, tokens_per_step.get(name), flops_per_step.get(name))
        for name, seconds in timing.phases.items()
    ]


def _fmt(value: Optional[float], spec: str) -> str:
    return NA if value is None else format(value, spec)


def _pct(fraction: Optional[float]) -> str:
    return NA if fraction is None else f"{100 * fraction:.1f}%"


def phase_table(
    rows: Sequence[PhaseRow],
    step_seconds: Optional[float] = None,
    step_tokens: Optional[float] = None,
    peak_flops: Optional[float] = None,
    title: Optional[str] = None,
    tokens_label: str = "tokens/s",
) -> str:
    """Format the per-phase table.

    ``step_seconds``: the whole step (default: the sum of the rows); the time
    outside the rows becomes an ``other`` row. ``step_tokens``: tokens the step
    produces (e.g. image tokens trained), for the step row's throughput.
    ``peak_flops``: the device's peak for MFU; None prints MFU as n/a.
    """
    total_phase_s = sum(r.seconds_per_step for r in rows)
    step_s = total_phase_s if step_seconds is None else step_seconds
    other_s = step_s - total_phase_s
    step_flops = None
    if any(r.flops_per_step is not None for r in rows):
        step_flops = sum(r.flops_per_step for r in rows if r.flops_per_step is not None)

    header = ("phase", "ms/step", "share", tokens_label, "MFU")
    lines: list[tuple[str, ...]] = []

    def add(name, seconds, tokens, flops):
        share = seconds / step_s if step_s > 0 else None
        # "-": the phase has no tokens/FLOPs to report; "n/a": they exist but cannot be computed
        tps = NONE if tokens is None else _fmt(tokens / seconds if seconds > 0 else None, ",.1f")
        util = NONE if flops is None else _pct(mfu(flops / seconds, peak_flops) if seconds > 0 else None)
        lines.append((name, f"{seconds * 1e3:.2f}", _pct(share), tps, util))

    for r in rows:
        add(r.phase, r.seconds_per_step, r.tokens_per_step, r.flops_per_step)
    if abs(other_s) > 1e-12 or step_seconds is not None:
        lines.append(("other", f"{other_s * 1e3:.2f}", _pct(other_s / step_s if step_s > 0 else None), "", ""))
    rule_at = len(lines)
    add("step", step_s, step_tokens, step_flops)

    widths = [max(len(header[i]), *(len(l[i]) for l in lines)) for i in range(len(header))]

    def render(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(render(header))
    out.append("  ".join("-" * w for w in widths))
    for i, cells in enumerate(lines):
        if i == rule_at:
            out.append("  ".join("-" * w for w in widths))
        out.append(render(cells))
    return "\n".join(out)


def ratio_table(ratios: Sequence[Ratio], title: Optional[str] = "comparisons (one run)") -> str:
    """Format comparison rows: label, baseline, candidate, and the ratio (>1 = candidate better)."""
    header = ("comparison", "baseline", "candidate", "ratio")
    lines = []
    for r in ratios:
        ratio = r.ratio
        lines.append(
            (
                r.label,
                f"{r.baseline:,.2f} {r.unit}",
                f"{r.candidate:,.2f} {r.unit}",
                NA if ratio is None else f"{ratio:.2f}x",
            )
        )
    widths = [max(len(header[i]), *(len(l[i]) for l in lines)) if lines else len(header[i]) for i in range(4)]

    def render(cells):
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    out = [title] if title else []
    out += [render(header), "  ".join("-" * w for w in widths)]
    out += [render(c) for c in lines]
    return "\n".join(out)


def device_line(device_name: str, dtype, peak: Optional[float]) -> str:
    """``device: NVIDIA H100 80GB HBM3, bfloat16, peak 989 TFLOP/s`` (or MFU n/a)."""
    dtype_name = str(dtype).replace("torch.", "")
    if peak is None:
        return f"device: {device_name}, {dtype_name}, peak FLOP/s unknown (MFU n/a)"
    return f"device: {device_name}, {dtype_name}, peak {peak / 1e12:,.0f} TFLOP/s (dense)"


def resource_lines(
    memory: Optional[MemoryStats] = None,
    nvml: Optional[NvmlStepStats] = None,
    nvml_unavailable_reason: Optional[str] = None,
) -> list[str]:
    """Peak memory and NVML figures as printable lines."""
    out = []
    if memory is not None:
        out.append(f"peak memory: {memory.describe()}")
    if nvml is not None and nvml.num_samples:
        energy = NA if nvml.energy_j is None else f"{nvml.energy_j:,.1f} J/step ({nvml.energy_source})"
        out.append(
            f"NVML: power {_fmt(nvml.power_w_mean, '.0f')} W mean / {_fmt(nvml.power_w_max, '.0f')} W max, "
            f"energy {energy}, utilisation {_fmt(nvml.gpu_util_pct_mean, '.0f')}%, "
            f"memory used {NA if nvml.mem_used_bytes_max is None else f'{nvml.mem_used_bytes_max / 2**30:.2f} GiB'}"
        )
    elif nvml_unavailable_reason is not None:
        out.append(f"NVML: n/a ({nvml_unavailable_reason})")
    return out
