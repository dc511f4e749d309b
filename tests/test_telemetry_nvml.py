"""NVML figures: a run without a GPU must not crash, and energy per step must be right."""

import logging
import types

import pytest

import ear_dist.telemetry.nvml as nvml_mod
from ear_dist.telemetry.nvml import NvmlMonitor, NvmlSample, integrate_power


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeNvmlError(Exception):
    pass


def make_fake_nvml(clock: FakeClock, power_w_at, energy_counter: bool):
    """A stand-in for pynvml: power follows power_w_at(t); the energy counter is its exact integral."""
    state = {"shutdown": False}

    def energy_mj(handle):
        if not energy_counter:
            raise FakeNvmlError("Not Supported")
        # the counter integrates a constant 50 W since t = 0 plus 1000 mJ at driver load
        return int(1000 + 50_000 * clock.t)

    return types.SimpleNamespace(
        NVMLError=FakeNvmlError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: state.__setitem__("shutdown", True),
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetPowerUsage=lambda h: int(power_w_at(clock.t) * 1000),
        nvmlDeviceGetTotalEnergyConsumption=energy_mj,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=70, memory=30),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=int(clock.t) * 2**20, total=80 * 2**30),
        state=state,
    )


def test_no_gpu_here_reports_once_and_returns_none(caplog, monkeypatch):
    monkeypatch.setattr(nvml_mod, "_warned_unavailable", False)
    with caplog.at_level(logging.WARNING, logger="ear_dist.telemetry.nvml"):
        first = NvmlMonitor(interval_s=0.01)  # the real pynvml: no driver on this machine
        second = NvmlMonitor(interval_s=0.01)
    assert not first.available and not second.available
    assert "LibraryNotFound" in first.unavailable_reason or "NotFound" in first.unavailable_reason
    warnings = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert first.unavailable_reason in warnings[0].getMessage()
    first.begin_step()
    stats = first.end_step()
    assert stats.energy_j is None and stats.power_w_mean is None and stats.mem_used_bytes_max is None
    assert stats.num_samples == 0
    assert all(v is None for v in stats.as_metrics().values())
    first.close()
    second.close()


def test_integrate_power_trapezoid():
    samples = [NvmlSample(0.0, 100.0, None, None), NvmlSample(1.0, 300.0, None, None), NvmlSample(3.0, 300.0, None, None)]
    # (100+300)/2 * 1 + 300 * 2 = 200 + 600
    assert integrate_power(samples) == pytest.approx(800.0)
    assert integrate_power(samples[:1]) is None


def test_energy_integrated_when_the_counter_is_unsupported():
    clock = FakeClock()
    # power ramps linearly: 100 W + 20 W/s from t = 100; trapezoids are exact on a line
    fake = make_fake_nvml(clock, lambda t: 100.0 + 20.0 * (t - 100.0), energy_counter=False)
    monitor = NvmlMonitor(device_index=0, interval_s=None, nvml_module=fake, clock=clock)
    assert monitor.available and not monitor.has_energy_counter and monitor.device_name == "Fake GPU"
    monitor.begin_step()
    for _ in range(4):
        clock.t += 0.5
        monitor.sample()
    clock.t += 1.0
    stats = monitor.end_step()
    # from t=100 to t=103: integral of 100 + 20 u du over u in [0, 3] = 300 + 90
    assert stats.energy_source == "integrated"
    assert stats.energy_j == pytest.approx(390.0)
    assert stats.num_samples == 6
    assert stats.power_w_max == pytest.approx(160.0)
    assert stats.gpu_util_pct_mean == pytest.approx(70.0)
    assert stats.mem_used_bytes_max == 103 * 2**20
    # the next step starts from fresh samples
    monitor.begin_step()
    clock.t += 2.0
    stats = monitor.end_step()
    # from t=103 (160 W) to t=105 (200 W): (160 + 200) / 2 * 2
    assert stats.energy_j == pytest.approx(360.0) and stats.num_samples == 2
    monitor.close()
    assert fake.state["shutdown"]


def test_energy_from_the_counter_when_supported():
    clock = FakeClock()
    fake = make_fake_nvml(clock, lambda t: 999.0, energy_counter=True)
    monitor = NvmlMonitor(device_index=0, interval_s=None, nvml_module=fake, clock=clock)
    assert monitor.has_energy_counter
    monitor.begin_step()
    clock.t += 2.5
    stats = monitor.end_step()
    # the counter's 50 W over 2.5 s, not the 999 W the power samples say
    assert stats.energy_source == "counter"
    assert stats.energy_j == pytest.approx(125.0)
    assert stats.power_w_mean == pytest.approx(999.0)
    monitor.close()


def test_background_thread_collects_samples():
    clock = FakeClock()
    fake = make_fake_nvml(clock, lambda t: 200.0, energy_counter=False)
    with NvmlMonitor(device_index=0, interval_s=0.005, nvml_module=fake, clock=clock) as monitor:
        monitor.begin_step()
        import time

        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with monitor._lock:
                if len(monitor._samples) >= 4:
                    break
            time.sleep(0.005)
        stats = monitor.end_step()
    assert stats.num_samples >= 5  # begin + at least 3 from the thread + end
    assert stats.power_w_mean == pytest.approx(200.0)
