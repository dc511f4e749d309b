"""Deltas: only the trained tensors (safetensors) plus metadata, and merging them into a full model.

A delta records the fingerprint of the base model it was trained from; applying it to
another base is an error. Several deltas compose as ``base + sum_i w_i (delta_i - base)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

from ear_dist.errors import InputError, RunFailure
from ear_dist.models.fingerprint import model_fingerprint
from ear_dist.storage import save_safetensors

FORMAT = "ear-dist-delta/1"


class DeltaError(InputError, ValueError):
    """A delta that cannot be applied; the message names the file and the reason."""


class NonFiniteDeltaError(RunFailure, ValueError):
    """Trained tensors that hold NaN or infinity: the run diverged, and no delta is written (exit 1)."""


def delta_problem(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``tensors`` are no usable delta: none at all, a tensor that is not floating point, or non-finite
    values (the first such tensor named, with how many of its values); None when they are fine."""
    if not tensors:
        return "holds no tensors"
    for name, t in tensors.items():
        if not t.is_floating_point():
            return f"tensor {name!r} is {str(t.dtype).replace('torch.', '')}; a delta holds floating-point weights"
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            total = sum(int((~torch.isfinite(x)).sum()) for x in tensors.values())
            count = sum(x.numel() for x in tensors.values())
            return (f"tensor {name!r} holds {bad} non-finite values (NaN or infinity; {total} of the delta's "
                    f"{count} values)")
    return None


def check_finite_delta(tensors: dict[str, torch.Tensor], where: Union[str, Path], writing: bool = True) -> None:
    """Refuse a delta that is empty, not floating point, or not finite.

    ``writing``: the trained tensors of a run about to be saved (``NonFiniteDeltaError``, exit 1: the run
    diverged); else a delta read to be applied or merged (``DeltaError``, exit 2: a bad input).
    """
    problem = delta_problem(tensors)
    if problem is None:
        return
    if writing:
        hint = ("; the run diverged (lower optim.lr, or check the pairs and the teacher)" if "non-finite" in problem
                else "")
        raise NonFiniteDeltaError(f"{where}: not written: the delta {problem}{hint}")
    raise DeltaError(f"{where}: {problem}; this delta cannot be applied")


def save_delta(path: Union[str, Path], tensors: dict[str, torch.Tensor], base_fingerprint: str, base_model: str,
               concepts: Sequence[str], config: dict, extra: Optional[dict] = None) -> Path:
    """Write the trained tensors with metadata; written to a temp name, then renamed (atomic).

    ``extra``: more metadata (the trainer records the run's hash, its identity and any
    segments trained under other settings); a failed write leaves no file and raises
    ``StorageError``.
    """
    path = Path(path)
    check_finite_delta(tensors, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "base_fingerprint": base_fingerprint,
        "base_model": str(base_model),
        "concepts": json.dumps(list(concepts)),
        "config": json.dumps(config),
        "extra": json.dumps(extra or {}),
    }
    return save_safetensors(path, tensors, meta)


def load_delta(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a delta -> (tensors, metadata with concepts/config decoded)."""
    meta = delta_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def delta_metadata(path: Union[str, Path]) -> dict:
    """A delta's metadata (concepts/config decoded, ``tensors``: how many it holds) without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"delta file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            count = len(list(f.keys()))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DeltaError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise DeltaError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("concepts", "config", "extra"):
        meta[key] = json.loads(meta.get(key, "null"))
    meta["tensors"] = count
    return meta


def _other_base(path: Union[str, Path], meta: dict, fingerprint: str) -> DeltaError:
    return DeltaError(
        f"{path}: trained from base model {meta.get('base_model')} (fingerprint {meta.get('base_fingerprint')}), "
        f"but the model given has fingerprint {fingerprint}; load the base model the delta was made from (its path "
        "and dtype do not matter, except that a float16 load of a float32 checkpoint changes the weights)")


def delta_changes(model: torch.nn.Module, deltas: Sequence[Union[str, Path]],
                  weights: Optional[Sequence[float]] = None, check_base: bool = True
                  ) -> Iterator[tuple[str, dict, dict[str, torch.Tensor]]]:
    """Per delta, checked against ``model``: (path, metadata, {tensor name: w (delta - base) in float64}).

    Errors: a delta made from another base model (fingerprint), a tensor name the model
    lacks, a shape mismatch, a weight that is not finite, a delta that is not finite.
    """
    weights = list(weights) if weights is not None else [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise DeltaError(f"got {len(weights)} weights for {len(deltas)} deltas")
    for d, w in zip(deltas, weights):
        if not math.isfinite(float(w)):
            raise DeltaError(f"--weight {w} for {d}: a delta's weight must be a finite number")
    fp = model_fingerprint(model) if check_base else None
    params = dict(model.named_parameters())
    for d, w in zip(deltas, weights):
        tensors, meta = load_delta(d)
        if check_base and meta["base_fingerprint"] != fp:
            raise _other_base(d, meta, fp)
        check_finite_delta(tensors, d, writing=False)
        changes = {}
        for name, t in tensors.items():
            if name not in params:
                raise DeltaError(f"{d}: tensor {name!r} does not exist in the model")
            base = params[name]
            if tuple(t.shape) != tuple(base.shape):
                raise DeltaError(f"{d}: tensor {name!r} has shape {tuple(t.shape)}, model has {tuple(base.shape)}")
            changes[name] = (t.to(base.device, torch.float64) - base.detach().double()) * w
        yield str(d), meta, changes


def add_changes(model: torch.nn.Module, changes: dict[str, torch.Tensor], what: str) -> None:
    """``p += change`` in float64, rounded once to each parameter's dtype; a result that overflows it is an error
    (``what`` says which deltas and weights were combined)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, diff in changes.items():
            # float64 holds base + (delta - base) exactly for float32/bf16 tensors, so one delta
            # merged into its base gives the delta's values rounded once to the base's dtype
            params[name].copy_(params[name].double() + diff)
            if not torch.isfinite(params[name]).all():
                raise DeltaError(f"{name}: {what} overflows the model's dtype; use smaller --weight values")


def apply_deltas(model: torch.nn.Module, deltas: Sequence[Union[str, Path]], weights: Optional[Sequence[float]] = None,
                 check_base: bool = True) -> dict:
    """Apply deltas in place: ``p = base + sum_i w_i (delta_i - base)``. Returns a report.

    Errors: those of ``delta_changes``. Two deltas that change the same tensor are reported as
    ``overlaps`` (composition sums their changes; ``ear_dist.models.compose`` composes them otherwise).
    """
    changes: dict[str, torch.Tensor] = {}
    owners: dict[str, list[str]] = {}
    concepts = []
    for d, meta, diffs in delta_changes(model, deltas, weights, check_base):
        concepts += meta["concepts"]
        for name, diff in diffs.items():
            changes[name] = changes[name] + diff if name in changes else diff
            owners.setdefault(name, []).append(d)
    weights = list(weights) if weights is not None else [1.0] * len(deltas)
    add_changes(model, changes, f"the weighted sum of the deltas ({', '.join(map(str, deltas))}, weights {weights})")
    overlaps = {n: o for n, o in owners.items() if len(o) > 1}
    return {"tensors": len(changes), "concepts": concepts, "overlaps": overlaps}


def check_deltas(model: torch.nn.Module, deltas: Sequence[Union[str, Path]]) -> list[dict]:
    """Read every delta's metadata and check it was made from ``model``; returns the metadata.

    Lets a command refuse a delta of another base before any work starts.
    """
    fp = model_fingerprint(model)
    metas = []
    for d in deltas:
        path = Path(d)
        meta = delta_metadata(path)
        if meta.get("base_fingerprint") != fp:
            raise _other_base(path, meta, fp)
        metas.append(meta)
    return metas


def file_digest(path: Union[str, Path]) -> str:
    """sha256 of a file's bytes (first 16 hex digits): names a delta's exact content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def applied_deltas(model: torch.nn.Module, deltas: Sequence[Union[str, Path]],
                   weights: Optional[Sequence[float]] = None) -> Iterator[dict]:
    """The model with deltas applied in memory for the ``with`` block, then restored exactly.

    Only the tensors the deltas change are copied (no merged model on disk or in memory),
    so one loaded base serves every column of an evaluation.
    """
    if not deltas:
        yield {"tensors": 0, "concepts": [], "overlaps": {}}
        return
    params = dict(model.named_parameters())
    names = set()
    for d in deltas:
        with safe_open(str(d), framework="pt") as f:
            names.update(f.keys())
    saved = {n: params[n].detach().clone() for n in names if n in params}
    try:
        yield apply_deltas(model, deltas, weights)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


@dataclass
class ChangeAgreement:
    """How two deltas' changes to the base relate, over the tensors both change."""

    first: str
    second: str
    shared_tensors: int
    cosine: float  # of the flattened changes; < 0: one partly undoes the other

    @property
    def opposed(self) -> bool:
        return self.cosine < 0


def compare_changes(base_state: dict, delta_paths: list) -> list[ChangeAgreement]:
    """Cosine between every two deltas' changes (delta - base) on the tensors they share.

    Composition sums the changes; a negative cosine means two concepts pull the same
    weights in opposite directions, so their sum erases each concept less than alone.
    """
    changes = []
    for path in delta_paths:
        tensors, _ = load_delta(path)
        changes.append({n: (t.float() - base_state[n].float()).flatten() for n, t in tensors.items()})
    out = []
    for i in range(len(changes)):
        for j in range(i + 1, len(changes)):
            shared = sorted(set(changes[i]) & set(changes[j]))
            if not shared:
                out.append(ChangeAgreement(str(delta_paths[i]), str(delta_paths[j]), 0, 0.0))
                continue
            a = torch.cat([changes[i][n] for n in shared])
            b = torch.cat([changes[j][n] for n in shared])
            cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            out.append(ChangeAgreement(str(delta_paths[i]), str(delta_paths[j]), len(shared), cosine))
    return out
