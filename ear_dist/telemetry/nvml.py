"""GPU power, energy, utilisation and memory from NVML (nvidia-ml-py).

Usage, once per step::

    monitor = NvmlMonitor()            # never raises; figures are None without NVML
    monitor.begin_step()
    ...                                # the step
    stats = monitor.end_step()         # NvmlStepStats

A background thread samples power, utilisation and memory every ``interval_s``.
Energy per step comes from the device's energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver loaded)
when the GPU supports it (Volta and newer), else from integrating the power
samples over the step (trapezoid rule, with a sample at each end of the step).

Without a GPU or driver, NVML is unavailable: this is logged once per process as
a warning ("NVML unavailable: <reason>") and every figure is None.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

logger = logging.getLogger(__name__)

__all__ = ["NvmlMonitor", "NvmlStepStats", "NvmlSample", "integrate_power"]

_warned_unavailable = False
_warn_lock = threading.Lock()


def _warn_unavailable_once(reason: str) -> None:
    global _warned_unavailable
    with _warn_lock:
        if not _warned_unavailable:
            _warned_unavailable = True
            logger.warning("NVML unavailable: %s", reason)


@dataclass(frozen=True)
class NvmlSample:
    time_s: float
    power_w: float
    gpu_util_pct: Optional[float]
    mem_used_bytes: Optional[int]


@dataclass(frozen=True)
class NvmlStepStats:
    """NVML figures over one step; every field is None when NVML is unavailable."""

    energy_j: Optional[float] = None
    # "counter" (the device's energy counter) or "integrated" (power samples over time)
    energy_source: Optional[str] = None
    power_w_mean: Optional[float] = None
    power_w_max: Optional[float] = None
    gpu_util_pct_mean: Optional[float] = None
    mem_used_bytes_max: Optional[int] = None
    num_samples: int = 0

    def as_metrics(self, prefix: str = "nvml/") -> dict:
        """The figures as a flat dict for the metrics writer (None where unknown)."""
        return {
            f"{prefix}energy_j": self.energy_j,
            f"{prefix}power_w_mean": self.power_w_mean,
            f"{prefix}power_w_max": self.power_w_max,
            f"{prefix}gpu_util_pct": self.gpu_util_pct_mean,
            f"{prefix}mem_used_gib": None if self.mem_used_bytes_max is None else self.mem_used_bytes_max / 2**30,
        }


def integrate_power(samples: list[NvmlSample]) -> Optional[float]:
    """Energy in joules from power samples (watts) by the trapezoid rule; None for < 2 samples."""
    if len(samples) < 2:
        return None
    energy = 0.0
    for a, b in zip(samples, samples[1:]):
        energy += 0.5 * (a.power_w + b.power_w) * (b.time_s - a.time_s)
    return energy


def _load_nvml():
    import pynvml

    return pynvml


def _torch_device_handle(nvml, device_index: Optional[int]):
    """The NVML handle of the GPU torch uses, honouring CUDA_VISIBLE_DEVICES.

    NVML numbers GPUs physically while torch numbers the visible ones, so the
    handle is looked up by UUID when torch can tell it.
    """
    if device_index is not None:
        return nvml.nvmlDeviceGetHandleByIndex(device_index)
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            uuid = getattr(props, "uuid", None)
            if uuid is not None:
                text = str(uuid)
                return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else "GPU-" + text)
    except Exception as e:  # fall back to LOCAL_RANK below; the UUID API differs across versions
        logger.debug("NVML handle by UUID failed: %s", e)
    return nvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("LOCAL_RANK", "0")))


class NvmlMonitor:
    """Samples one GPU through NVML and reports per-step power, energy, utilisation and memory.

    ``device_index``: the NVML (physical) index; None = the GPU torch is using.
    ``interval_s``: background sampling period; None = no thread, samples only at
    ``begin_step``/``end_step`` and on explicit :meth:`sample` calls.
    ``nvml_module`` and ``clock`` exist so tests can substitute a fake NVML and time.
    """

    def __init__(
        self,
        device_index: Optional[int] = None,
        interval_s: Optional[float] = 0.1,
        nvml_module=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._clock = clock
        self._interval_s = interval_s
        self._samples: list[NvmlSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._energy_start_mj: Optional[int] = None
        self._has_energy_counter = False
        self._nvml = None
        self._handle = None
        self.unavailable_reason: Optional[str] = None
        try:
            nvml = nvml_module if nvml_module is not None else _load_nvml()
            nvml.nvmlInit()
            self._handle = _torch_device_handle(nvml, device_index)
            self._nvml = nvml
            self.device_name = _as_str(nvml.nvmlDeviceGetName(self._handle))
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            self.unavailable_reason = f"{type(e).__name__}: {e}"
            self.device_name = None
            _warn_unavailable_once(self.unavailable_reason)
            return
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self._has_energy_counter = True
        except Exception:  # NVMLError_NotSupported on pre-Volta GPUs: integrate power instead
            self._has_energy_counter = False

    @property
    def available(self) -> bool:
        return self._nvml is not None

    @property
    def has_energy_counter(self) -> bool:
        return self._has_energy_counter

    def sample(self) -> Optional[NvmlSample]:
        """Read power, utilisation and memory now and keep the sample for the current step."""
        if not self.available:
            return None
        nvml, h = self._nvml, self._handle
        try:
            power_w = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
        except Exception as e:
            logger.debug("NVML power read failed: %s", e)
            return None
        util = mem = None
        try:
            util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:  # utilisation is unsupported on some virtualised GPUs
            pass
        try:
            mem = int(nvml.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            pass
        s = NvmlSample(self._clock(), power_w, util, mem)
        with self._lock:
            self._samples.append(s)
        return s

    def begin_step(self) -> None:
        """Start a step: clear samples, read the energy counter, start the sampler thread."""
        if not self.available:
            return
        with self._lock:
            self._samples = []
        if self._has_energy_counter:
            self._energy_start_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        self.sample()
        if self._interval_s and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def end_step(self) -> NvmlStepStats:
        """Finish the step and return its figures (all None when NVML is unavailable)."""
        if not self.available:
            return NvmlStepStats()
        self.sample()
        with self._lock:
            samples = sorted(self._samples, key=lambda s: s.time_s)
            self._samples = []
        energy_j = None
        source = None
        if self._has_energy_counter and self._energy_start_mj is not None:
            end_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            energy_j = (end_mj - self._energy_start_mj) / 1000.0
            source = "counter"
        else:
            energy_j = integrate_power(samples)
            source = "integrated" if energy_j is not None else None
        powers = [s.power_w for s in samples]
        utils = [s.gpu_util_pct for s in samples if s.gpu_util_pct is not None]
        mems = [s.mem_used_bytes for s in samples if s.mem_used_bytes is not None]
        return NvmlStepStats(
            energy_j=energy_j,
            energy_source=source,
            power_w_mean=sum(powers) / len(powers) if powers else None,
            power_w_max=max(powers) if powers else None,
            gpu_util_pct_mean=sum(utils) / len(utils) if utils else None,
            mem_used_bytes_max=max(mems) if mems else None,
            num_samples=len(samples),
        )

    def close(self) -> None:
        """Stop the sampler thread and shut NVML down."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:
                logger.debug("nvmlShutdown failed: %s", e)
            self._nvml = None

    def __enter__(self) -> "NvmlMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_str(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
