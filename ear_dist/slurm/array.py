"""The per-concept outputs of a job array: one delta per concept under train.out_dir.

``collect_concept_deltas(cfg)`` looks in ``<train.out_dir>/<concept>/`` for every concept
of ``slurm.concepts`` and says which deltas exist, which are missing, and which were
trained for another concept; ``merge_args`` gives the ``ear-dist merge`` arguments that
compose the ones found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ear_dist.config import Config
from ear_dist.slurm.checks import concept_dir_name

DELTA_NAME = "delta.safetensors"


@dataclass
class ConceptOutput:
    """One concept's output directory and what it holds."""

    concept: str
    index: int
    out_dir: Path
    delta: Optional[Path]  # None when missing
    trained_concepts: list[str] = field(default_factory=list)
    problem: str = ""  # why the delta cannot be used, if it cannot


@dataclass
class ArrayDeltas:
    """Which concepts of an array job have a usable delta."""

    outputs: list[ConceptOutput]

    @property
    def found(self) -> list[ConceptOutput]:
        return [o for o in self.outputs if o.delta is not None and not o.problem]

    @property
    def missing(self) -> list[ConceptOutput]:
        return [o for o in self.outputs if o.delta is None or o.problem]

    @property
    def complete(self) -> bool:
        return not self.missing

    def merge_args(self, weights: Optional[dict[str, float]] = None) -> list[str]:
        """``--delta PATH [--weight W]`` for every usable delta, in concept order."""
        args = []
        for o in self.found:
            args += ["--delta", str(o.delta)]
            if weights is not None:
                args += ["--weight", str(weights.get(o.concept, 1.0))]
        return args

    def report(self) -> str:
        """One line per concept: found (with the trained concepts) or missing (with why)."""
        lines = []
        for o in self.outputs:
            if o.delta is not None and not o.problem:
                lines.append(f"[{o.index}] {o.concept}: {o.delta} (trained for {', '.join(o.trained_concepts)})")
            else:
                why = o.problem or f"no {DELTA_NAME} in {o.out_dir}"
                lines.append(f"[{o.index}] {o.concept}: MISSING: {why}")
        return "\n".join(lines)


def _delta_concepts(path: Path) -> list[str]:
    """The concepts a delta's metadata names (reads the header only, not the tensors)."""
    from safetensors import safe_open

    from ear_dist.models.delta import FORMAT

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    return list(json.loads(meta.get("concepts", "[]")))


def collect_from_out_dir(out_dir: Path, concepts: list[str]) -> ArrayDeltas:
    """The deltas under ``out_dir/<concept>/`` for each concept, checked against their metadata."""
    outputs = []
    for index, concept in enumerate(concepts):
        concept_dir = Path(out_dir) / concept_dir_name(concept)
        path = concept_dir / DELTA_NAME
        out = ConceptOutput(concept, index, concept_dir, path if path.is_file() else None)
        if out.delta is not None:
            try:
                out.trained_concepts = _delta_concepts(path)
            except Exception as e:  # a truncated or foreign file: report it, do not stop the listing
                out.problem = f"{path}: not a readable delta ({e})"
            else:
                if concept not in out.trained_concepts:
                    out.problem = f"{path} was trained for {out.trained_concepts}, not {concept!r}"
        outputs.append(out)
    return ArrayDeltas(outputs)


def collect_concept_deltas(cfg: Config) -> ArrayDeltas:
    """The per-concept deltas of the array job described by ``cfg`` (slurm.concepts, train.out_dir)."""
    return collect_from_out_dir(Path(cfg.train.out_dir), list(cfg.slurm.concepts))
