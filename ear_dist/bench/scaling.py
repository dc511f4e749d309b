"""Benchmark figures per rank, reduced across ranks, and scaling against the same bench on one rank.

Every student rank measures its own figures (step time, image tokens/s, MFU, memory,
time inside collectives, power); they are gathered and shown as mean, min and max over
the ranks, because in data-parallel training the slowest rank sets the pace. The job's
throughput is therefore the image tokens all student ranks train per step divided by
the slowest rank's step time, and per GPU it is divided by every rank the job holds
(teacher ranks of the dedicated placement included). Scaling efficiency is that per-GPU
throughput over the throughput of the same bench on one rank (its ``bench.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch.distributed as dist

from ear_dist.errors import InputError

BENCH_JSON = "bench.json"


@dataclass(frozen=True)
class Spread:
    """One figure over the ranks that have it."""

    mean: float
    min: float
    max: float

    def as_dict(self) -> dict:
        return {"mean": self.mean, "min": self.min, "max": self.max}


def rank_spread(local: Mapping[str, Optional[float]], group=None) -> dict[str, Optional[Spread]]:
    """Mean, min and max of each figure over the ranks of ``group`` (a collective when distributed).

    A figure that is None on a rank (NVML missing there, say) is left out for that rank;
    one that no rank has is None.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, dict(local), group=group)
    else:
        gathered = [dict(local)]
    out: dict[str, Optional[Spread]] = {}
    for name in sorted(local):
        values = [g[name] for g in gathered if g.get(name) is not None and math.isfinite(g[name])]
        out[name] = Spread(sum(values) / len(values), min(values), max(values)) if values else None
    return out


def spread_table(spread: Mapping[str, Optional[Spread]], ranks: int, formats: Mapping[str, str]) -> str:
    """The per-rank figures as a table: one row per figure, mean / min / max over ``ranks`` ranks."""
    header = ("per rank", "mean", "min", "max")
    rows = []
    for name, fmt in formats.items():
        s = spread.get(name)
        cells = ("n/a",) * 3 if s is None else tuple(format(v, fmt) for v in (s.mean, s.min, s.max))
        rows.append((name, *cells))
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(4)]

    def render(cells):
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    lines = [f"figures of each of the {ranks} student ranks (the slowest rank sets the pace)", render(header),
             "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [render(r) for r in rows])


def read_baseline(path: Union[str, Path]) -> dict:
    """A one-rank ``bench.json`` to scale against; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--baseline {path}: no such file (run `ear-dist bench` on one rank first; "
                                f"it writes {BENCH_JSON} in its --out directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"--baseline {path}: not JSON ({e})") from None
    for key in ("ranks", "image_tokens_per_s_per_gpu"):
        if not isinstance(data.get(key), (int, float)):
            raise InputError(f"--baseline {path}: key {key!r} missing or not a number; expected a {BENCH_JSON} "
                             "written by `ear-dist bench`")
    if data["ranks"] != 1:
        raise InputError(f"--baseline {path}: measured on {data['ranks']} ranks; the baseline is the bench on one rank")
    return data


def scaling_efficiency(per_gpu_tokens_per_s: float, baseline: Mapping) -> float:
    """Per-GPU throughput at N ranks over the one-rank throughput (1.0 = perfect scaling)."""
    return per_gpu_tokens_per_s / baseline["image_tokens_per_s_per_gpu"]
