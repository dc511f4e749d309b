"""VF (Visual Filter): keep a pair only if the teacher's images say it is a good pair.

For each pair the teacher samples an image for the target prompt and one for the
surrogate prompt (one batched CFG rollout for both, with the same seed); a classifier
then decides whether each image shows the concept. A pair is kept when the target
image shows the concept and the surrogate image does not. The surrogate rollout tokens
(and, optionally, the target's) are stored on the kept pair, so training reuses them.

The classifiers are the plugins of ``ear_dist.data.classifiers`` (NudeNet, ResNet-50,
a local Hugging Face image classifier, ``module:function``), the same ones eval uses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ear_dist.data.classifiers import (  # noqa: F401  (re-exported: the filter's plugins)
    DEFAULT_NUDENET_CLASSES,
    CallableClassifier,
    ClassifierError,
    ConceptClassifier,
    Detection,
    HFImageClassifier,
    NudeNetClassifier,
    ResNet50Classifier,
    build_classifier,
)
from ear_dist.data.pairs import PromptPair
from ear_dist.errors import InputError

# --------------------------------------------------------------------------- the filter


@dataclass
class FilterReport:
    """Counts of what the filter kept and dropped, and why."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none dropped"
        return f"visual filter: kept {self.kept} of {self.total} ({why})"


DROP_TARGET_MISSING = "target image lacks the concept"
DROP_SURROGATE_SHOWS = "surrogate image shows the concept"
DROP_BOTH = "both"


class VisualFilter:
    """Run the teacher and a classifier over pairs.

    ``generate(prompts, seeds) -> LongTensor [N, T]`` is the teacher's batched CFG
    rollout; ``decode(tokens) -> uint8 [N, H, W, 3]`` its image decoder. A pair without
    a seed gets ``base_seed + its position`` and keeps it, so its tokens can be reproduced.
    """

    def __init__(
        self,
        generate: Callable[[list[str], list[int]], torch.Tensor],
        decode: Callable[[torch.Tensor], np.ndarray],
        classifier: ConceptClassifier,
        batch_size: int = 8,
        store_target_tokens: bool = False,
        base_seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"vf.batch_size must be >= 1, got {batch_size}")
        self.generate = generate
        self.decode = decode
        self.classifier = classifier
        self.batch_size = batch_size
        self.store_target_tokens = store_target_tokens
        self.base_seed = base_seed
        self.report = FilterReport()

    def filter_batch(self, pairs: list[PromptPair], first_position: int = 0) -> list[PromptPair]:
        """Filter one batch; updates ``self.report``; returns the kept pairs with tokens set."""
        for pair in pairs:
            if not pair.surrogate:
                raise ValueError(f"pair {pair.id} ({pair.source}) has no surrogate prompt; the visual filter needs pairs")
        seeds = [p.seed if p.seed >= 0 else self.base_seed + first_position + i for i, p in enumerate(pairs)]
        n = len(pairs)
        # both prompts of every pair in one rollout batch, same seed per pair
        tokens = self.generate([p.target for p in pairs] + [p.surrogate for p in pairs], seeds + seeds)
        if tokens.shape[0] != 2 * n:
            raise ValueError(f"generate returned {tokens.shape[0]} rows for {2 * n} prompts")
        images = self.decode(tokens)
        concepts = [p.concept for p in pairs]
        found = self.classifier.detect(images, concepts + concepts)
        kept = []
        for i, pair in enumerate(pairs):
            target_ok, surrogate_clean = found[i].present, not found[n + i].present
            self.report.total += 1
            if target_ok and surrogate_clean:
                self.report.kept += 1
                pair.seed = seeds[i]
                pair.surrogate_tokens = tokens[n + i].tolist()
                if self.store_target_tokens:
                    pair.target_tokens = tokens[i].tolist()
                kept.append(pair)
            elif not target_ok and not surrogate_clean:
                self.report.dropped[DROP_BOTH] += 1
            elif not target_ok:
                self.report.dropped[DROP_TARGET_MISSING] += 1
            else:
                self.report.dropped[DROP_SURROGATE_SHOWS] += 1
        return kept

    def run(self, pairs: Sequence[PromptPair], progress: bool = False) -> list[PromptPair]:
        """Filter all pairs in batches of ``batch_size``."""
        starts = range(0, len(pairs), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="visual filter", unit="batch")
        kept = []
        for s in starts:
            kept += self.filter_batch(list(pairs[s : s + self.batch_size]), first_position=s)
        return kept


def teacher_functions(bundle, guidance_weight: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                      batch_size: int = 8, decode_mode: str = "eager") -> tuple[Callable, Callable]:
    """``generate`` and ``decode`` for ``VisualFilter`` from a loaded model of either family (``decode_mode``: rollout.decode)."""
    from ear_dist.models.family import as_image_model

    bundle = as_image_model(bundle)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return bundle.sample(prompts, guidance_weight=guidance_weight, temperature=temperature, top_k=top_k,
                                 seeds=seeds, batch_size=batch_size, decode=decode_mode)

    def decode(tokens: torch.Tensor) -> np.ndarray:
        return bundle.decode(tokens, batch_size=batch_size)

    return generate, decode
