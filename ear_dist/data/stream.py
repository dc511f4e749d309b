"""The training pairs of a run: read, checked, and dealt out as the same stream on every rank.

All ranks draw the same seeded stream of global batches (``train.pairs_per_step``
pairs per optimizer step); student rank r trains on its contiguous slice of each, so
one process and N processes see the same data, and a teacher rank (dedicated
placement) knows what each student trains on without being told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ear_dist.data.pairs import PromptPair

log = logging.getLogger("ear_dist.data")


class PairsError(ValueError):
    """Training pairs that cannot be used; the message names the pair and the field."""


@dataclass
class PairBatch:
    """Prompt pairs of one step on one rank, with the rollout tokens the pairs bring (if every pair has them)."""

    target_prompts: list[str]
    surrogate_prompts: list[str]
    concepts: list[str]
    seeds: list[int]
    surrogate_tokens: Optional[torch.Tensor] = None  # [B, T] teacher rollouts of the surrogate prompts
    target_tokens: Optional[torch.Tensor] = None  # [B, T] teacher rollouts of the target prompts

    def __len__(self) -> int:
        return len(self.target_prompts)


@dataclass
class PairCheck:
    """What validating the pairs found (counts for the run summary)."""

    missing_concept: list[str] = field(default_factory=list)


def check_pairs(pairs: Sequence[PromptPair], on_missing_concept: str, num_image_tokens: int) -> PairCheck:
    """Reject empty prompts and stored tokens of the wrong length; warn about (or reject) target
    prompts without their concept word (preservation anchors, whose surrogate is the target
    itself, carry no concept word)."""
    if not pairs:
        raise PairsError("data.pairs: no prompt pairs to train on")
    report = PairCheck()
    for i, p in enumerate(pairs):
        where = f"pair {i} (id {p.id}, source {p.source or '-'})"
        if not p.target.strip():
            raise PairsError(f"{where}: field 'target' is empty")
        if not p.surrogate.strip():
            raise PairsError(f"{where}: field 'surrogate' is empty")
        if p.concept and not p.is_anchor and p.concept.lower() not in p.target.lower():
            msg = f"{where}: target prompt {p.target!r} does not contain the concept {p.concept!r}"
            if on_missing_concept == "fail":
                raise PairsError(msg + " (set erase.on_missing_concept=warn to train on it anyway)")
            report.missing_concept.append(p.id)
            log.warning(msg)
        for name in ("surrogate_tokens", "target_tokens"):
            toks = getattr(p, name)
            if toks is not None and len(toks) != num_image_tokens:
                raise PairsError(f"{where}: field {name!r} has {len(toks)} tokens, the model makes {num_image_tokens}")
    return report


def load_training_pairs(cfg) -> list[PromptPair]:
    """The pairs named by ``data.pairs`` (any supported format, or a shard directory)."""
    from ear_dist.data.readers import ReadReport, read_pairs

    if not cfg.data.pairs:
        raise PairsError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    report = ReadReport()
    pairs = read_pairs(cfg.data.pairs, cfg.data.format, cfg.data.on_error, cfg.erase.concept, report)
    if report.skipped:
        log.warning("%s: skipped %d malformed rows: %s", cfg.data.pairs, report.skipped, report.skip_reasons[:5])
    return pairs


def _stack(rows: list) -> Optional[torch.Tensor]:
    if not rows or any(r is None for r in rows):
        return None
    return torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r in rows]))


@dataclass
class GlobalBatch:
    """The ``pairs_per_step`` pairs of one optimizer step, with their positions in the batch."""

    step: int
    items: list[tuple[int, PromptPair]]

    def local(self, dp_index: int, dp_world: int, device=None) -> PairBatch:
        """Student ``dp_index``'s contiguous slice, as a PairBatch.

        A pair without its own seed gets ``step * pairs_per_step + position in the global
        batch``, so its rollout does not depend on how many ranks share the batch.
        """
        per_rank = len(self.items) // dp_world
        chunk = self.items[dp_index * per_rank: (dp_index + 1) * per_rank]
        pairs = [p for _, p in chunk]
        seeds = [p.seed if p.seed >= 0 else self.step * len(self.items) + pos for pos, p in chunk]
        sur, tar = _stack([p.surrogate_tokens for p in pairs]), _stack([p.target_tokens for p in pairs])
        return PairBatch([p.target for p in pairs], [p.surrogate for p in pairs], [p.concept for p in pairs], seeds,
                         sur.to(device) if sur is not None and device is not None else sur,
                         tar.to(device) if tar is not None and device is not None else tar)


class PairStream:
    """Endless global batches of ``pairs_per_step`` pairs, reshuffled each pass (seeded, the same on every rank)."""

    def __init__(self, pairs: Sequence[PromptPair], pairs_per_step: int, seed: int = 0, shuffle: bool = True):
        if pairs_per_step > len(pairs):
            raise PairsError(f"train.pairs_per_step: {pairs_per_step} > the {len(pairs)} pairs available")
        self.pairs = list(pairs)
        self.pairs_per_step = pairs_per_step
        self._batches = self._generate(seed, shuffle)
        self.step = 0

    def _generate(self, seed: int, shuffle: bool) -> Iterator[list[tuple[int, PromptPair]]]:
        g = torch.Generator().manual_seed(seed)
        n, k = len(self.pairs), self.pairs_per_step
        while True:
            order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
            for s in range(0, n - k + 1, k):
                yield [(pos, self.pairs[i]) for pos, i in enumerate(order[s: s + k])]

    def skip(self, steps: int) -> None:
        """Advance past ``steps`` global batches (a resumed run skips what it trained)."""
        for _ in range(steps):
            self.next()

    def next(self) -> GlobalBatch:
        batch = GlobalBatch(self.step, next(self._batches))
        self.step += 1
        return batch

    def concepts(self) -> list[str]:
        """The concepts the pairs carry, sorted."""
        return sorted({p.concept for p in self.pairs if p.concept})
