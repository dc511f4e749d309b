"""Peak memory per step: the CUDA caching allocator on GPU, the process's peak RSS on CPU.

The two are different quantities and are labelled so: on GPU,
``torch.cuda.memory_stats`` gives the peak of tensor memory allocated (and the
peak the allocator reserved from the driver) since the last reset, so it is a
per-step figure; on CPU, ``resource.getrusage`` gives the peak resident set size
of the whole process since it started, which cannot be reset and includes the
interpreter, libraries and every tensor.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["MemoryStats", "current_rss_bytes", "peak_memory", "reset_peak_memory"]

CUDA_ALLOCATED = "cuda peak allocated"
PROCESS_RSS = "process peak RSS (since start)"


@dataclass(frozen=True)
class MemoryStats:
    """A peak memory figure in bytes and what it measures (``kind``)."""

    peak_bytes: int
    kind: str
    reserved_peak_bytes: Optional[int] = None  # CUDA only
    device_total_bytes: Optional[int] = None  # CUDA only

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def as_metrics(self, prefix: str = "memory/") -> dict:
        """GiB figures for the metrics writer; the key says which kind of peak it is."""
        name = "cuda_peak_allocated_gib" if self.kind == CUDA_ALLOCATED else "cpu_peak_rss_gib"
        out = {f"{prefix}{name}": self.peak_gib}
        if self.reserved_peak_bytes is not None:
            out[f"{prefix}cuda_peak_reserved_gib"] = self.reserved_peak_bytes / 2**30
        return out

    def describe(self) -> str:
        text = f"{self.peak_gib:.2f} GiB {self.kind}"
        if self.reserved_peak_bytes is not None:
            text += f", {self.reserved_peak_bytes / 2**30:.2f} GiB reserved"
        if self.device_total_bytes:
            text += f" of {self.device_total_bytes / 2**30:.1f} GiB"
        return text


def _process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def peak_memory(device: Optional[torch.device | str] = None) -> MemoryStats:
    """Peak memory on ``device`` since the last :func:`reset_peak_memory` (CUDA) or process start (CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return MemoryStats(
            peak_bytes=int(stats.get("allocated_bytes.all.peak", 0)),
            kind=CUDA_ALLOCATED,
            reserved_peak_bytes=int(stats.get("reserved_bytes.all.peak", 0)),
            device_total_bytes=int(torch.cuda.get_device_properties(device).total_memory),
        )
    return MemoryStats(peak_bytes=_process_peak_rss_bytes(), kind=PROCESS_RSS)


def reset_peak_memory(device: Optional[torch.device | str] = None) -> None:
    """Start a new peak window on CUDA; a no-op on CPU, where the OS keeps one peak per process."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def current_rss_bytes() -> Optional[int]:
    """The process's resident set size now (Linux ``/proc/self/statm``); None where it cannot be read."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
