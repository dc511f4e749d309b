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

from ear_dist.errors import InputError

# Fields a serialized pair must carry; the rest have defaults.
REQUIRED_FIELDS = ("target", "concept")


class PairsError(InputError, ValueError):
    """Training pairs that cannot be used; the message names the pair and the field."""


TOKEN_FIELDS = ("surrogate_tokens", "target_tokens")


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

    def to_dict(self, tokens: bool = True) -> dict:
        """A JSON-safe dict; token lists (all of them with ``tokens=False``) and ``extra`` are left out when empty."""
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
        if tokens and self.surrogate_tokens is not None:
            out["surrogate_tokens"] = [int(t) for t in self.surrogate_tokens]
        if tokens and self.target_tokens is not None:
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


def check_stored_tokens(pair: PromptPair, where: str, num_image_tokens: int, codebook_size: Optional[int]) -> None:
    """Raise ``PairsError`` when a pair's stored rollout tokens cannot be the model's image tokens.

    Two ways they do not fit: a count other than the model's image tokens per image, and
    an id outside ``[0, codebook_size)`` (which would otherwise end as an index error deep
    inside the model's embedding; not checked when ``codebook_size`` is None). ``where``
    names the pair (file and row, or shard and sample).
    """
    import numpy as np

    for name in TOKEN_FIELDS:
        tokens = getattr(pair, name)
        if tokens is None:
            continue
        ids = np.asarray(tokens)
        if ids.ndim != 1 or len(ids) != num_image_tokens:
            raise PairsError(f"{where}: field {name!r} has {ids.size} tokens, the model makes {num_image_tokens} "
                             "image tokens per image (rollouts stored for another model?)")
        if codebook_size is not None and len(ids) and (int(ids.max()) >= codebook_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= codebook_size else int(ids.min())
            position = int(np.nonzero(ids == bad)[0][0])
            raise PairsError(f"{where}: field {name!r} holds token id {bad} at position {position}, outside the "
                             f"model's image codebook [0, {codebook_size}) (rollouts stored for another model?)")
