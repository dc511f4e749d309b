"""Metrics to TensorBoard (rank 0) and JSON lines, reduced over ranks.

Every rank calls :meth:`MetricsWriter.write` with the same metric names at the
same step; when ``torch.distributed`` is initialised the figures are reduced
across ranks first (each metric by its declared reduction: mean, max, min or
sum), and rank 0 alone writes them:

* TensorBoard scalars (``events.out.tfevents.*`` in ``log_dir``), one tag per metric;
* ``log_dir/metrics.jsonl``: one JSON object per step, ``{"step": .., "wall_time":
  .., <metric>: <value>, ...}``, for scripts.

A metric may be None on some ranks (NVML missing on one node, say): the
reduction uses the ranks that have a value, and a metric no rank has is None in
the JSON line and absent from TensorBoard. Non-finite values are written to
TensorBoard as they are and as null in the JSON line, which stays strict JSON.

Reductions are declared by exact name or by fnmatch pattern, e.g.
``{"throughput/*": "sum", "time/*": "max"}``; the default is mean.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist

__all__ = ["MetricsWriter", "REDUCTIONS", "read_jsonl", "write_json"]

REDUCTIONS = ("mean", "max", "min", "sum")
JSONL_NAME = "metrics.jsonl"


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


class MetricsWriter:
    """Reduce per-rank metrics and write them on rank 0 to TensorBoard and JSON lines.

    ``log_dir``: where rank 0 writes. ``reductions``: metric name or fnmatch
    pattern -> one of REDUCTIONS. ``tensorboard``: False writes only the JSON
    lines. ``group``: the process group to reduce over (default: the world).
    """

    def __init__(
        self,
        log_dir: Union[str, Path],
        reductions: Optional[Mapping[str, str]] = None,
        default_reduction: str = "mean",
        tensorboard: bool = True,
        group=None,
    ):
        self.log_dir = Path(log_dir)
        self.group = group
        self._reductions: dict[str, str] = {}
        self.default_reduction = _check_reduction("default_reduction", default_reduction)
        for name, op in (reductions or {}).items():
            self.declare(name, op)
        self.rank = dist.get_rank(group) if _dist_active() else 0
        self.world_size = dist.get_world_size(group) if _dist_active() else 1
        self._tb = None
        self._jsonl = None
        if self.rank == 0:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.log_dir))
            self._jsonl = open(self.log_dir / JSONL_NAME, "a", encoding="utf-8")

    def declare(self, name: str, reduction: str) -> None:
        """Set how metric ``name`` (or an fnmatch pattern) is reduced over ranks."""
        self._reductions[name] = _check_reduction(name, reduction)

    def reduction_of(self, name: str) -> str:
        if name in self._reductions:
            return self._reductions[name]
        for pattern, op in self._reductions.items():
            if fnmatch.fnmatchcase(name, pattern):
                return op
        return self.default_reduction

    def reduce(self, metrics: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
        """The metrics reduced over ranks (a collective when torch.distributed is initialised)."""
        values = {k: _as_float(k, v) for k, v in metrics.items()}
        if not _dist_active() or self.world_size == 1:
            return {k: values[k] for k in sorted(values)}
        keys = sorted(values)
        ops = [self.reduction_of(k) for k in keys]
        device = self._reduce_device()

        # Every rank must send the same names: compare a checksum first, on a
        # fixed-size tensor, so a mismatch raises on all ranks instead of hanging.
        signature = float(zlib.crc32("\n".join(f"{k}:{o}" for k, o in zip(keys, ops)).encode()))
        check = torch.tensor([signature, -signature], dtype=torch.float64, device=device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX, group=self.group)
        if check[0].item() != -check[1].item():
            raise ValueError(
                f"MetricsWriter.write: ranks passed different metric names or reductions; "
                f"rank {self.rank} passed {keys}"
            )

        # sum and mean: value (0 when missing) and a count of ranks that have one
        summed = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
        # max and min in one MAX reduction: min(x) = -max(-x); missing = -inf
        maxed = torch.full((len(keys),), -math.inf, dtype=torch.float64, device=device)
        for i, (k, op) in enumerate(zip(keys, ops)):
            v = values[k]
            if v is None:
                continue
            summed[2 * i] = v
            summed[2 * i + 1] = 1.0
            maxed[i] = -v if op == "min" else v
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=self.group)
        summed_l, maxed_l = summed.tolist(), maxed.tolist()

        out: dict[str, Optional[float]] = {}
        for i, (k, op) in enumerate(zip(keys, ops)):
            total, count = summed_l[2 * i], summed_l[2 * i + 1]
            if count == 0:
                out[k] = None
            elif op == "sum":
                out[k] = total
            elif op == "mean":
                out[k] = total / count
            elif op == "max":
                out[k] = maxed_l[i]
            else:
                out[k] = -maxed_l[i]
        return out

    def _reduce_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def write(self, step: int, metrics: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
        """Reduce ``metrics`` over ranks and, on rank 0, write them for ``step``; returns the reduced dict."""
        reduced = self.reduce(metrics)
        if self.rank != 0:
            return reduced
        if self._tb is not None:
            for k, v in reduced.items():
                if v is not None:
                    self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        record = {"step": int(step), "wall_time": time.time()}
        record.update({k: (v if v is not None and math.isfinite(v) else None) for k, v in reduced.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        return reduced

    def close(self) -> None:
        """Flush TensorBoard and ``metrics.jsonl`` to disk and close them (a rank may then leave with ``os._exit``)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_reduction(name: str, op: str) -> str:
    if op not in REDUCTIONS:
        raise ValueError(f"metric {name!r}: reduction {op!r} is not one of {', '.join(REDUCTIONS)}")
    return op


def _as_float(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r}: expected a number or None, got {type(value).__name__} {value!r}") from None


def read_jsonl(path: Union[str, Path]) -> Iterator[dict]:
    """The step records of a ``metrics.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: not a JSON object: {e}") from None


def write_json(path: Union[str, Path], data) -> Path:
    """Write ``data`` as JSON under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
