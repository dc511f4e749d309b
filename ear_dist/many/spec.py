"""The concepts file of ``ear-dist erase-many``: which concepts, their words, pairs, anchors; checked before any work.

```yaml
route: joint            # joint | array
pairs_per_concept: 32
compose: sum            # array: how the per-concept deltas are composed (ear_dist.models.merge)
concepts:
  - name: church
    words: [church, chapel]
    category: object
    pairs: church_pairs.json
    surrogates: [barn, castle]
    anchors: [a red barn in a field]
  - name: van gogh
keep: [barn, castle]
```

Every error names the file, the entry (``concepts[1] (van gogh)``) and the field, and is an
``InputError`` (exit 2). Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ear_dist.errors import InputError

ROUTES = ("joint", "array")
CATEGORIES = ("object", "style")
TOP_KEYS = {"route", "pairs_per_concept", "compose", "steps", "concepts", "keep"}
ENTRY_KEYS = {"name", "words", "category", "pairs", "surrogates", "anchors", "anchors_file", "suite"}


class ConceptsFileError(InputError, ValueError):
    """A concepts file that cannot be used as given; the message names file, entry and field."""


@dataclass
class ConceptEntry:
    """One concept to erase."""

    name: str
    words: list[str] = field(default_factory=list)  # training words; empty: the concept's name (world: its train split)
    category: str = ""
    pairs: str = ""  # a pairs file, absolute; empty: ECG generates the pairs
    surrogates: list[str] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)
    anchors_file: str = ""
    suite: str = ""  # an eval suite file for a real model (the world has its own suites)

    @property
    def slug(self) -> str:
        """The concept's directory name under each stage ("van gogh" -> "van-gogh")."""
        return "-".join(self.name.split()).replace("/", "-")


@dataclass
class ManySpec:
    """A validated concepts file."""

    path: str
    concepts: list[ConceptEntry]
    route: str = "joint"
    pairs_per_concept: int = 32
    compose: str = "sum"
    steps: int = 0  # 0: train.steps (x the number of concepts for the joint route)
    keep: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def to_dict(self) -> dict:
        return asdict(self)

    def file_dict(self) -> dict:
        """The spec in the concepts file's own form (paths absolute, empty fields left out)."""
        top = {"route": self.route, "pairs_per_concept": self.pairs_per_concept, "compose": self.compose}
        if self.steps:
            top["steps"] = self.steps
        if self.keep:
            top["keep"] = list(self.keep)
        top["concepts"] = [{k: v for k, v in asdict(c).items() if v} for c in self.concepts]
        return top

    def digest(self) -> str:
        """A hash of what the file asks for (not where it lies): the identity of the output directory."""
        body = {k: v for k, v in self.to_dict().items() if k not in ("path", "route")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _strings(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConceptsFileError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return [v.strip() for v in value]


def _file(value, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConceptsFileError(f"{where}: expected a file path, got {value!r}")
    p = (base / value).resolve()
    if not p.exists():
        raise ConceptsFileError(f"{where}: {p} does not exist")
    return str(p)


def _entry(item, i: int, file: Path) -> ConceptEntry:
    label = f"{file}: concepts[{i}]"
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise ConceptsFileError(f"{label}: expected a mapping with at least 'name', got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConceptsFileError(f"{label}: field 'name': missing or empty")
    name = " ".join(name.split()).lower()
    label = f"{label} ({name})"
    unknown = sorted(set(item) - ENTRY_KEYS)
    if unknown:
        raise ConceptsFileError(f"{label}: unknown field(s) {', '.join(map(str, unknown))} "
                                f"(known: {', '.join(sorted(ENTRY_KEYS))})")
    entry = ConceptEntry(name)
    for key in ("words", "surrogates", "anchors"):
        if key in item:
            setattr(entry, key, _strings(item[key], f"{label}: field '{key}'"))
    if "category" in item:
        if item["category"] not in CATEGORIES:
            raise ConceptsFileError(f"{label}: field 'category': {item['category']!r} is not one of "
                                    f"{', '.join(CATEGORIES)}")
        entry.category = item["category"]
    for key in ("pairs", "anchors_file", "suite"):
        if key in item:
            setattr(entry, key, _file(item[key], file.parent, f"{label}: field '{key}'"))
    return entry


def load_spec(path) -> ManySpec:
    """Read and check a concepts file (YAML or JSON); raises ``ConceptsFileError`` naming file, entry and field."""
    from ear_dist.config import ConfigError
    from ear_dist.config.loading import read_file

    file = Path(path)
    if not file.is_file():
        raise ConceptsFileError(f"--concepts {file}: no such file")
    try:
        data = read_file(file)
    except ConfigError as e:
        raise ConceptsFileError(str(e)) from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConceptsFileError(f"{file}: unknown field(s) {', '.join(map(str, unknown))} "
                                f"(known: {', '.join(sorted(TOP_KEYS))})")
    items = data.get("concepts")
    if not isinstance(items, list) or not items:
        raise ConceptsFileError(f"{file}: field 'concepts': expected a non-empty list of concepts")
    concepts = [_entry(item, i, file.resolve()) for i, item in enumerate(items)]
    first: dict[str, int] = {}
    for i, c in enumerate(concepts):
        if c.slug in first:
            raise ConceptsFileError(f"{file}: concepts[{i}] ({c.name}): field 'name': the same concept as "
                                    f"concepts[{first[c.slug]}]")
        first[c.slug] = i
    spec = ManySpec(str(file.resolve()), concepts)
    route = data.get("route", "joint")
    if route not in ROUTES:
        raise ConceptsFileError(f"{file}: field 'route': {route!r} is not one of {', '.join(ROUTES)}")
    spec.route = route
    for key in ("pairs_per_concept", "steps"):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "pairs_per_concept"
                                                                                 else 0):
                raise ConceptsFileError(f"{file}: field '{key}': expected a positive integer, got {value!r}")
            setattr(spec, key, value)
    if "compose" in data:
        methods = compose_methods()
        if data["compose"] not in methods:
            raise ConceptsFileError(f"{file}: field 'compose': {data['compose']!r} is not one of {', '.join(methods)}")
        spec.compose = data["compose"]
    if "keep" in data:
        spec.keep = [" ".join(k.split()).lower() for k in _strings(data["keep"], f"{file}: field 'keep'")]
        erased = set(spec.names) & set(spec.keep)
        if erased:
            raise ConceptsFileError(f"{file}: field 'keep': {', '.join(sorted(erased))} is erased too; a concept is "
                                    "either erased or kept")
    return spec


def compose_methods() -> tuple[str, ...]:
    """How per-concept deltas may be composed: ``sum``, plus the methods of ``ear_dist.models.compose`` where
    that module is installed (interference-removing composition)."""
    try:
        from ear_dist.models.compose import METHODS
    except ImportError:
        return ("sum",)
    return tuple(dict.fromkeys(("sum", *METHODS)))


def check_entry_for_route(spec: ManySpec, index: Optional[int]) -> None:
    """``--array-task I``: I must name a concept of the file."""
    if index is not None and not 0 <= index < len(spec.concepts):
        raise ConceptsFileError(f"--array-task {index}: {spec.path} has {len(spec.concepts)} concepts "
                                f"(0-{len(spec.concepts) - 1})")
