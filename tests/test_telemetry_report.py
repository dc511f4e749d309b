"""The bench table a user reads: every cell computed from the inputs, n/a where it cannot be."""

import pytest

from ear_dist.telemetry.memory import MemoryStats, PROCESS_RSS
from ear_dist.telemetry.nvml import NvmlStepStats
from ear_dist.telemetry.report import (
    PhaseRow,
    Ratio,
    device_line,
    phase_rows,
    phase_table,
    ratio_table,
    resource_lines,
)
from ear_dist.telemetry.timer import StepTiming


def parse(table: str) -> dict[str, list[str]]:
    """Rows of a rendered table keyed by their first cell (rules and title skipped)."""
    rows = {}
    for line in table.splitlines():
        cells = line.split()
        if cells and not set(line.replace(" ", "")) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_phase_table_cells():
    timing = StepTiming(step_s=2.0, phases={"teacher_rollout": 1.0, "student_fwd_bwd": 0.5, "optimizer": 0.25})
    rows = phase_rows(
        timing,
        tokens_per_step={"teacher_rollout": 576, "student_fwd_bwd": 576},
        flops_per_step={"teacher_rollout": 400e12, "student_fwd_bwd": 300e12},
    )
    assert rows[0] == PhaseRow("teacher_rollout", 1.0, 576, 400e12)
    table = phase_table(rows, step_seconds=timing.step_s, step_tokens=576, peak_flops=1000e12, title="t")
    cells = parse(table)
    assert table.splitlines()[0] == "t"
    # rollout: 1000 ms, 1.0/2.0 = 50 %, 576 tokens / 1 s, 400e12 / 1 s / 1000e12 = 40 %
    assert cells["teacher_rollout"] == ["1000.00", "50.0%", "576.0", "40.0%"]
    # student: 500 ms, 25 %, 576 / 0.5 s = 1152, 300e12 / 0.5 / 1000e12 = 60 %
    assert cells["student_fwd_bwd"] == ["500.00", "25.0%", "1,152.0", "60.0%"]
    assert cells["optimizer"] == ["250.00", "12.5%", "-", "-"]
    # outside the phases: 2.0 - 1.75 = 0.25 s
    assert cells["other"] == ["250.00", "12.5%"]
    # step: 576 / 2 s = 288 tokens/s, 700e12 / 2 s / 1000e12 = 35 %
    assert cells["step"] == ["2000.00", "100.0%", "288.0", "35.0%"]


def test_phase_table_without_peak_reports_na():
    rows = [PhaseRow("student_fwd_bwd", 0.5, tokens_per_step=100, flops_per_step=1e9)]
    cells = parse(phase_table(rows, peak_flops=None))
    assert cells["student_fwd_bwd"] == ["500.00", "100.0%", "200.0", "n/a"]
    assert "other" not in cells  # no step time given: the rows are the step
    assert cells["step"] == ["500.00", "100.0%", "-", "n/a"]


def test_ratios():
    step = Ratio("step ours vs official", baseline=12000.0, candidate=1500.0)
    rollout = Ratio("rollout ours vs generate", baseline=300.0, candidate=900.0, unit="tok/s", higher_is_better=True)
    assert step.ratio == pytest.approx(8.0) and rollout.ratio == pytest.approx(3.0)
    assert Ratio("zero", 1.0, 0.0).ratio is None
    text = ratio_table([step, rollout, Ratio("zero", 1.0, 0.0)])
    lines = text.splitlines()
    assert lines[0] == "comparisons (one run)"
    assert lines[3].startswith("step ours vs official") and lines[3].endswith("8.00x")
    assert "12,000.00 ms" in lines[3] and "1,500.00 ms" in lines[3]
    assert lines[4].endswith("3.00x") and "900.00 tok/s" in lines[4]
    assert lines[5].endswith("n/a")


def test_device_and_resource_lines():
    assert device_line("NVIDIA H100 80GB HBM3", "torch.bfloat16", 989e12) == (
        "device: NVIDIA H100 80GB HBM3, bfloat16, peak 989 TFLOP/s (dense)"
    )
    assert device_line("cpu", "float32", None) == "device: cpu, float32, peak FLOP/s unknown (MFU n/a)"
    memory = MemoryStats(peak_bytes=3 * 2**30, kind=PROCESS_RSS)
    lines = resource_lines(memory, NvmlStepStats(), nvml_unavailable_reason="NVMLError_LibraryNotFound")
    assert lines == ["peak memory: 3.00 GiB process peak RSS (since start)", "NVML: n/a (NVMLError_LibraryNotFound)"]
    stats = NvmlStepStats(
        energy_j=150.0, energy_source="counter", power_w_mean=300.0, power_w_max=420.0,
        gpu_util_pct_mean=97.0, mem_used_bytes_max=40 * 2**30, num_samples=10,
    )
    assert resource_lines(nvml=stats) == [
        "NVML: power 300 W mean / 420 W max, energy 150.0 J/step (counter), utilisation 97%, memory used 40.00 GiB"
    ]
