"""Composing per-concept deltas (one run per concept, as a job array makes them) without their interference.

Summed deltas interfere: delta_i also changes what its layers output on concept j's
prompts, so the composed model erases concept j less (or damages what it keeps). Three
ways to compose:

- ``sum``: ``base + sum_i w_i (delta_i - base)``, what ``merge`` has always done (bitwise the same);
- ``project``: for every linear weight a delta changes, the base model's inputs to that
  layer are collected on each concept's prompts and on the kept prompts (teacher-forced on
  the base model's own CFG samples of them, with the unconditional prompt: the inputs the
  layer sees while sampling, as the preservation anchors are measured in
  ``ear_dist.train.preserve``); delta_i's change is projected off the principal subspace
  (``energy`` of each prompt set's input energy) of the OTHER concepts' and the kept
  prompts' inputs, ``D_i <- D_i (I - Q Q^T)``, so ``D_i x = 0`` for those inputs; then summed;
- ``ties``: TIES merging, per entry of each linear weight: each delta's change trimmed to
  its ``density`` share of largest magnitudes, the sign elected by the trimmed changes' sum,
  the mean of the trimmed changes that agree with it.

Tensors that are not linear weights (norms, biases) are summed whatever the method and
reported in ``Composition.summed``. Projection and trimming run in float32 whatever the
deltas' dtype; the changes are accumulated and added to the base in float64 as
``apply_deltas`` does, and the result is checked finite.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ear_dist.errors import InputError
from ear_dist.models.delta import DeltaError, add_changes, delta_changes, delta_metadata

METHODS = ("sum", "project", "ties")
SUBSPACES = ("union", "pooled")


@dataclass
class Composition:
    """Composed changes to the base (float64, by tensor name) and what the composition did."""

    method: str
    changes: dict[str, torch.Tensor]
    deltas: list[str]
    concepts: list[str]
    overlaps: dict[str, list[str]] = field(default_factory=dict)  # tensor -> the deltas that change it (> 1)
    summed: list[str] = field(default_factory=list)  # tensors changed by > 1 delta that are no linear weight: summed
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # project: delta -> layer -> rank projected off
    kept_norm: dict[str, float] = field(default_factory=dict)  # project: delta -> |projected| / |change| (linear)

    def report(self) -> dict:
        return {"method": self.method, "tensors": len(self.changes), "concepts": self.concepts,
                "overlaps": self.overlaps, "summed": self.summed, "kept_norm": self.kept_norm,
                "ranks": self.ranks}


def compose_deltas(base, deltas: Sequence[Union[str, Path]], concept_prompts: Sequence[Sequence[str]] = (),
                   kept_prompts: Sequence[str] = (), method: str = "sum", energy: float = 0.999,
                   weights: Optional[Sequence[float]] = None, check_base: bool = True, guidance_weight: float = 5.0,
                   seed: int = 0, density: float = 0.2, batch_size: int = 16,
                   other_concepts: bool = True, subspace: str = "union") -> Composition:
    """Compose ``deltas`` of the loaded ``base`` (a Janus bundle or an ``ImageModel``) by ``method``.

    ``concept_prompts[i]``: prompts of delta i's concept(s) (``project`` needs one non-empty list per delta);
    ``kept_prompts``: prompts no delta may change (``project``); ``weights`` scale each delta's change first;
    ``other_concepts=False``: ``project`` projects off the kept prompts' inputs only (each delta may still change
    the other erased concepts' outputs; their prompts are not read). ``subspace``: ``union`` projects off the
    union of each prompt set's principal subspace (every set keeps ``energy`` of its input energy unchanged);
    ``pooled`` off the principal subspace of the sets' moments pooled (each normalised to unit trace), as
    ``preserve.nullspace`` pools its anchors: a smaller subspace, so more of each delta is left.
    Prompt set k is sampled with seeds from ``seed + k`` (deterministic). Nothing of ``base`` is changed:
    ``apply_composition`` applies the result.
    """
    if method not in METHODS:
        raise InputError(f"compose method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0 < energy <= 1:
        raise InputError(f"compose energy {energy}: expected a share in (0, 1]")
    if not 0 < density <= 1:
        raise InputError(f"compose density {density}: expected a share in (0, 1]")
    if subspace not in SUBSPACES:
        raise InputError(f"compose subspace {subspace!r}: expected one of {', '.join(SUBSPACES)}")
    from ear_dist.models.family import as_image_model
    from ear_dist.train.adapters import linear_weights

    bundle = as_image_model(base)
    model = bundle.model
    paths, per_delta, concepts, linear = [], [], [], set()
    for d, meta, changes in delta_changes(model, deltas, weights, check_base):
        paths.append(d)
        if method != "sum":  # the linear changes are projected or merged in float32: held so (half the memory)
            found = set(linear_weights(model, sorted(changes)))
            linear |= found
            changes = {n: c.float() if n in found else c for n, c in changes.items()}
        per_delta.append(changes)
        concepts += meta["concepts"]
    owners: dict[str, list[int]] = {}
    for i, changes in enumerate(per_delta):
        for name in changes:
            owners.setdefault(name, []).append(i)
    out = Composition(method, {}, paths, concepts,
                      overlaps={n: [paths[i] for i in o] for n, o in owners.items() if len(o) > 1},
                      summed=sorted(n for n, o in owners.items() if len(o) > 1 and n not in linear))
    if method == "project" and not other_concepts:
        if not list(kept_prompts):
            raise InputError("compose project of the kept prompts only: no kept prompts given")
        _project(bundle, per_delta, paths, sorted(linear), [], list(kept_prompts), energy, guidance_weight,
                 seed + len(paths), batch_size, out, shared=True, subspace=subspace)
    elif method == "project":
        if len(concept_prompts) != len(paths) or any(not list(p) for p in concept_prompts):
            missing = [paths[i] for i in range(len(paths)) if i >= len(concept_prompts) or not list(concept_prompts[i])]
            raise InputError(f"compose project: no prompts of the concept of {', '.join(missing)}")
        _project(bundle, per_delta, paths, sorted(linear), [list(p) for p in concept_prompts], list(kept_prompts),
                 energy, guidance_weight, seed, batch_size, out, subspace=subspace)
    elif method == "ties":
        _ties(per_delta, sorted(linear), density)
    for i, changes in enumerate(per_delta):  # what remains of each delta is summed, in float64
        for name, diff in changes.items():
            diff = diff.double()
            out.changes[name] = out.changes[name] + diff if name in out.changes else diff
    return out


def apply_composition(model: torch.nn.Module, composition: Composition) -> dict:
    """Add the composed changes to ``model``'s weights in place (float64, rounded once); returns the report."""
    add_changes(model, composition.changes,
                f"the {composition.method} composition of the deltas ({', '.join(composition.deltas)})")
    return composition.report()


def _project(bundle, per_delta: list[dict], paths: list[str], linear: list[str], concept_prompts: list[list[str]],
             kept_prompts: list[str], energy: float, guidance_weight: float, seed: int, batch_size: int,
             out: Composition, shared: bool = False, subspace: str = "union") -> None:
    """Each delta's linear changes projected off the other prompt sets' principal input subspaces, in place
    (``shared``: every delta off every set: the kept prompts alone)."""
    from ear_dist.train.adapters import input_second_moments, principal_basis
    from ear_dist.train.preserve import anchor_rollouts, teacher_forced_feed

    sets = [*concept_prompts, *([kept_prompts] if kept_prompts else [])]
    moments: list[dict[str, torch.Tensor]] = []  # per prompt set: layer -> its inputs' moment / trace (float64)
    for k, prompts in enumerate(sets):
        tokens = anchor_rollouts(bundle, prompts, guidance_weight, seed + k, batch_size)
        found = input_second_moments(bundle.model, linear, teacher_forced_feed(bundle, prompts, tokens, batch_size))
        for name in linear:
            if name not in found:
                raise DeltaError(f"compose project: layer {name} saw no input on the prompts of set {k}")
        moments.append({n: m / torch.trace(m).clamp(min=1e-300) for n, m in found.items()})
    # union: per set, its principal basis U [in, k]; pooled: computed per (layer, sets) below
    bases = [{n: principal_basis(m[n], energy)[0] for n in linear} for m in moments] if subspace == "union" else []
    unions: dict[tuple, torch.Tensor] = {}  # (layer, the sets) -> basis: the kept prompts' alone is one per layer
    for i, changes in enumerate(per_delta):
        others = tuple(k for k in range(len(moments)) if shared or k != i)
        before = after = 0.0
        out.ranks[paths[i]] = {}
        for name in linear:
            if name not in changes:
                continue
            if (name, others) not in unions:
                dim = changes[name].shape[1]
                if subspace == "union":
                    unions[(name, others)] = _union_basis([bases[k][name] for k in others], dim)
                else:
                    unions[(name, others)] = principal_basis(sum(moments[k][name] for k in others), energy)[0] \
                        if others else torch.zeros(dim, 0, dtype=torch.float64)
            q = unions[(name, others)]
            change = changes[name].float()
            projected = change - (change @ q.float()) @ q.float().T
            before += float(change.double().pow(2).sum())
            after += float(projected.double().pow(2).sum())
            changes[name] = projected
            out.ranks[paths[i]][name] = q.shape[1]
        out.kept_norm[paths[i]] = math.sqrt(after / before) if before > 0 else 1.0


def _union_basis(bases: list[torch.Tensor], dim: int, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis [dim, k] (float64) of the span of several orthonormal bases' columns."""
    if not bases:
        return torch.zeros(dim, 0, dtype=torch.float64)
    stacked = sum(u @ u.T for u in bases)
    values, vectors = torch.linalg.eigh(stacked)
    return vectors[:, values > tol]


def ties_merge(changes: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES on one tensor: each change trimmed to its ``ceil(density n)`` largest magnitudes (ties at the threshold
    kept), the sign per entry elected by the sum of the trimmed changes, the mean of the trimmed changes that agree
    with it (zero where none does). float32."""
    trimmed = []
    for c in changes:
        c = c.float()
        flat = c.abs().flatten()
        k = max(1, math.ceil(density * flat.numel()))
        threshold = torch.topk(flat, k, sorted=True).values[-1]
        trimmed.append(torch.where(c.abs() >= threshold, c, torch.zeros_like(c)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _ties(per_delta: list[dict], linear: list[str], density: float) -> None:
    """Each linear weight's changes replaced by their TIES merge (held by the first delta that changes it)."""
    for name in linear:
        holders = [i for i, c in enumerate(per_delta) if name in c]
        merged = ties_merge([per_delta[i][name] for i in holders], density)
        for i in holders:
            del per_delta[i][name]
        per_delta[holders[0]][name] = merged


# --------------------------------------------------------------------------- prompts of a delta's concept


def read_prompts_file(path: Union[str, Path], what: str) -> list[str]:
    """Prompts of a file: a .txt one per line, any pairs format its targets (``data.pairs`` formats)."""
    from ear_dist.data.readers import ReadReport, read_pairs
    from ear_dist.paths import check_input_file

    p = check_input_file(path, what)
    if not p.exists():
        raise InputError(f"{what}: {p}: file not found")
    if p.suffix.lower() == ".txt":
        try:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as e:
            raise InputError(f"{what}: {p}: not valid UTF-8 (byte offset {e.start})") from None
        prompts = [ln for ln in lines if ln]
    else:
        prompts = [pair.target for pair in read_pairs(p, "auto", "fail", "", ReadReport())]
    if not prompts:
        raise InputError(f"{what}: {p}: holds no prompts")
    return list(dict.fromkeys(prompts))


def run_prompts(delta: Union[str, Path]) -> list[str]:
    """The target prompts its run trained on, from the ``data.pairs`` its metadata (the run's config) names: those
    of the delta's concepts where the pairs say, else all."""
    from ear_dist.data.readers import ReadReport, read_pairs

    meta = delta_metadata(delta)
    data = (meta.get("config") or {}).get("data") or {}
    source = data.get("pairs") or ""
    hint = "; pass --concept-prompts CONCEPT=FILE"
    if not source:
        raise InputError(f"{delta}: its run's config names no data.pairs file (pairs given in memory){hint}")
    path = Path(source)
    if not path.exists() and not path.is_absolute():
        path = Path(delta).parent / source  # a run directory moved with its pairs
    if not path.exists():
        raise InputError(f"{delta}: the pairs file of its run, {source}, is not found{hint}")
    pairs = read_pairs(path, data.get("format") or "auto", "skip", "", ReadReport())
    wanted = {c.lower() for c in meta.get("concepts") or []}
    chosen = [p.target for p in pairs if (p.concept or "").lower() in wanted] or [p.target for p in pairs]
    if not chosen:
        raise InputError(f"{delta}: the pairs file of its run, {path}, holds no prompts{hint}")
    return list(dict.fromkeys(chosen))


def concept_prompts_for(deltas: Sequence[Union[str, Path]], given: Sequence[str] = ()) -> list[list[str]]:
    """Per delta, its concept's prompts: ``given`` as ``CONCEPT=FILE`` (matched to a delta by the concepts its
    metadata names, or by its path), else read from the delta's run (``run_prompts``)."""
    files: dict[str, str] = {}
    for spec in given:
        concept, sep, file = spec.partition("=")
        if not sep or not concept.strip() or not file.strip():
            raise InputError(f"--concept-prompts {spec!r}: expected CONCEPT=FILE")
        files[concept.strip().lower()] = file.strip()
    matches = []
    for d in deltas:
        keys = [c.lower() for c in delta_metadata(d).get("concepts") or []] + [str(d).lower()]
        matches.append(next((k for k in keys if k in files), None))
    unused = sorted(set(files) - set(matches))
    if unused:
        raise InputError(f"--concept-prompts {unused[0]}: no delta erases this concept (the deltas' concepts: "
                         f"{', '.join(sorted({c for d in deltas for c in delta_metadata(d)['concepts']}))})")
    return [read_prompts_file(files[m], f"--concept-prompts {m}") if m is not None else run_prompts(d)
            for d, m in zip(deltas, matches)]


# --------------------------------------------------------------------------- composed in memory


@dataclass(frozen=True)
class ComposeSpec:
    """How an evaluation column composes its deltas: the method and the prompts ``project`` needs."""

    method: str = "sum"
    concept_prompts: tuple[tuple[str, ...], ...] = ()
    kept_prompts: tuple[str, ...] = ()
    energy: float = 0.999
    guidance_weight: float = 5.0
    density: float = 0.2
    other_concepts: bool = True  # project: off the other concepts' inputs too, not the kept prompts' alone
    subspace: str = "union"  # project: union of each set's principal subspace, or that of the pooled moments

    def key(self) -> list:
        """What an image of the column depends on beyond the deltas' bytes (empty for ``sum``)."""
        if self.method == "sum":
            return []
        if self.method == "ties":
            return [f"compose={self.method}", self.density]
        return [f"compose={self.method}", self.energy, self.guidance_weight, [list(p) for p in self.concept_prompts],
                list(self.kept_prompts), *([] if self.other_concepts else ["kept prompts only"]),
                *([] if self.subspace == "union" else [self.subspace])]


_CACHE: dict = {}


@contextlib.contextmanager
def composed_in_memory(bundle, deltas: Sequence[str], spec: Optional[ComposeSpec]) -> Iterator[dict]:
    """The model with the composed deltas applied for the ``with`` block, then restored exactly; ``sum`` (or no
    spec) is ``applied_deltas``. The composition of a column is computed once per process."""
    from ear_dist.models.delta import applied_deltas
    from ear_dist.models.family import as_image_model

    model = as_image_model(bundle).model
    if spec is None or spec.method == "sum" or not deltas:
        with applied_deltas(model, list(deltas)) as report:
            yield report
        return
    key = (id(model), tuple(deltas), spec)
    if key not in _CACHE:
        _CACHE.clear()  # one column at a time: the changes of the last one only
        _CACHE[key] = compose_deltas(bundle, deltas, spec.concept_prompts, spec.kept_prompts, spec.method,
                                     spec.energy, guidance_weight=spec.guidance_weight, density=spec.density,
                                     other_concepts=spec.other_concepts, subspace=spec.subspace)
    composition = _CACHE[key]
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in composition.changes}
    try:
        yield apply_composition(model, composition)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
