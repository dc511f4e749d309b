"""The prompt-pair schema every reader produces and every later stage consumes.

A pair is a target prompt (shows the concept to erase) and a surrogate prompt (the same
sentence with the concept replaced). A pair whose surrogate equals its target is a
preservation anchor: its guided target is the teacher's own output on that prompt, so it
pulls the student back wherever it drifted (by more than the loss threshold). Evaluation
prompt lists (Six-CD, COCO-30k, test prompt files) are read into the same record with an
empty surrogate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

# Fields a serialized pair must carry; the rest have defaults.
REQUIRED_FIELDS = ("target", "concept")


@dataclass
class PromptPair:
    target: str
    surrogate: str = ""
    concept: str = ""
    surrogate_concept: str = ""
    category: str = ""
    # where the pair came from: "ear-json:train_church.json", "ecg-template", "ecg-llm:MODEL", ...
    source: str = ""
    # evaluation seed (Six-CD, COCO) or the rollout seed the visual filter used; -1 = none
    seed: int = -1
    id: str = ""
    # image token ids of the teacher's rollouts, stored so training does not sample again
    surrogate_tokens: Optional[list[int]] = None
    target_tokens: Optional[list[int]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = pair_id(self.target, self.surrogate, self.concept)

    @property
    def is_anchor(self) -> bool:
        """A preservation anchor: the surrogate is the target itself (no concept to erase in it)."""
        return bool(self.target.strip()) and self.target.strip() == self.surrogate.strip()

    def to_dict(self) -> dict:
        """A JSON-safe dict; token lists and ``extra`` are left out when empty."""
        out: dict[str, Any] = {
            "id": self.id,
            "target": self.target,
            "surrogate": self.surrogate,
            "concept": self.concept,
            "surrogate_concept": self.surrogate_concept,
            "category": self.category,
            "source": self.source,
            "seed": int(self.seed),
        }
        if self.surrogate_tokens is not None:
            out["surrogate_tokens"] = [int(t) for t in self.surrogate_tokens]
        if self.target_tokens is not None:
            out["target_tokens"] = [int(t) for t in self.target_tokens]
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> "PromptPair":
        """Build a pair from ``to_dict`` output; ``where`` (file:row) prefixes error messages."""
        prefix = f"{where}: " if where else ""
        if not isinstance(data, dict):
            raise ValueError(f"{prefix}expected a JSON object, got {type(data).__name__}")
        known = {
            "id", "target", "surrogate", "concept", "surrogate_concept", "category",
            "source", "seed", "surrogate_tokens", "target_tokens", "extra",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{prefix}unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for name in REQUIRED_FIELDS:
            if name not in data:
                raise ValueError(f"{prefix}field '{name}' is missing")
        kwargs: dict[str, Any] = {}
        for name in ("id", "target", "surrogate", "concept", "surrogate_concept", "category", "source"):
            if name in data:
                value = data[name]
                if not isinstance(value, str):
                    raise ValueError(f"{prefix}field '{name}': expected a string, got {type(value).__name__}")
                kwargs[name] = value
        if not kwargs["target"].strip():
            raise ValueError(f"{prefix}field 'target': empty prompt")
        if "seed" in data:
            seed = data["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"{prefix}field 'seed': expected an integer, got {seed!r}")
            kwargs["seed"] = seed
        for name in ("surrogate_tokens", "target_tokens"):
            tokens = data.get(name)
            if tokens is not None:
                if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                    raise ValueError(f"{prefix}field '{name}': expected a list of integer token ids")
                kwargs[name] = tokens
        if "extra" in data:
            if not isinstance(data["extra"], dict):
                raise ValueError(f"{prefix}field 'extra': expected an object")
            kwargs["extra"] = data["extra"]
        return cls(**kwargs)


def pair_id(target: str, surrogate: str, concept: str) -> str:
    """A stable id from the prompt text, so the same pair gets the same id in every run."""
    digest = hashlib.sha1(f"{concept}\x00{target}\x00{surrogate}".encode("utf-8")).hexdigest()
    return digest[:16]


def normalize_prompt(text: str) -> str:
    """Case- and whitespace-insensitive form used for de-duplication."""
    return " ".join(text.lower().split())
