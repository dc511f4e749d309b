"""Which layers ``trainable.layers`` means for a model of ``n`` layers.

A recipe names its layers relative to the model (``all-but-first``, ``share:0.25``), so the
same recipe means something on the world's 4-layer model, Janus-Pro-1B (24) and 7B (30).
An empty spec keeps the older key, the first ``first_k_layers``; ``skip_first_layers``
leaves the model's first n layers frozen whichever spec chose them.
"""

from __future__ import annotations

import math
import re

from ear_dist.errors import InputError

LAYER_SPECS = "all | all-but-first | all-but-first:N | first:K | share:F"
_SPEC = re.compile(r"^(all|all-but-first|all-but-first:(\d+)|first:(\d+)|share:([0-9.]+))$")


def check_layers_spec(spec: str, key: str = "trainable.layers") -> None:
    """Raise when ``spec`` is not one of ``LAYER_SPECS`` (empty is allowed: the older keys decide)."""
    if spec == "":
        return
    m = _SPEC.match(spec.strip())
    bad = m is None
    if not bad and m.group(4) is not None:
        try:
            share = float(m.group(4))
        except ValueError:
            share = -1.0
        bad = not 0.0 < share <= 1.0
    if not bad and m.group(3) is not None:
        bad = int(m.group(3)) < 1
    if bad:
        raise InputError(f"{key}: {spec!r} is not a layer spec ({LAYER_SPECS}; share F in (0, 1], K >= 1)")


def resolve_layers(spec: str, n_layers: int, first_k_layers: int = 5, skip_first_layers: int = 0) -> range:
    """The layer indices ``spec`` selects in a model of ``n_layers`` layers, less the first ``skip_first_layers``.

    all: every layer; all-but-first[:N]: all but the first (N) layers; first:K: the first K
    (every layer when the model has fewer); share:F: the first round(F * n) layers, at least one.
    Empty: the first ``first_k_layers`` (the caller checks that they fit the model).
    """
    spec = spec.strip()
    check_layers_spec(spec)
    if spec == "":
        stop = first_k_layers
    elif spec == "all":
        stop = n_layers
    elif spec.startswith("all-but-first"):
        skip = int(spec.split(":", 1)[1]) if ":" in spec else 1
        skip_first_layers = max(skip_first_layers, skip)
        stop = n_layers
    elif spec.startswith("first:"):
        stop = min(int(spec.split(":", 1)[1]), n_layers)
    else:
        stop = max(1, min(n_layers, math.floor(float(spec.split(":", 1)[1]) * n_layers + 0.5)))
    return range(min(skip_first_layers, stop), stop)


def describe_layers(layers: range, n_layers: int) -> str:
    """``layers 1-3 of 4`` (or ``no layer of 4``)."""
    if not layers:
        return f"no layer of {n_layers}"
    if len(layers) == 1:
        return f"layer {layers.start} of {n_layers}"
    return f"layers {layers.start}-{layers.stop - 1} of {n_layers}"
