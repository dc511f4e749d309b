"""Concept classifier on token grids, with thresholds calibrated on rendered images.

Scores, each in [0, 1]:
- object: the largest share of the object's codes (any palette) inside any square
  window of the smallest motif size; a real object is a compact patch, a few scattered
  codes are not;
- scene: the share of the grid in the scene's background codes (any palette);
- style: the share of the grid in the style's palette block.

A concept is present when its score reaches its threshold. ``calibrate`` picks each
threshold on rendered images with known attributes: the cut that maximises balanced
accuracy, placed in the middle of the widest gap among equally good cuts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ear_dist.world.grammar import WorldRecord
from ear_dist.world.render import CodeLayout
from ear_dist.world.vocabulary import Vocabulary, planted


def concept_kind(concept: str, vocab: Optional[Vocabulary] = None) -> str:
    """object, scene or style (in ``vocab``, default the planted world's)."""
    vocab = vocab or planted()
    if concept in vocab.objects:
        return "object"
    if concept in vocab.scenes:
        return "scene"
    if concept in vocab.styles:
        return "style"
    raise ValueError(f"unknown concept {concept!r}: expected one of {', '.join(all_concepts(vocab))}")


def all_concepts(vocab: Optional[Vocabulary] = None) -> list[str]:
    vocab = vocab or planted()
    return list(vocab.objects) + list(vocab.scenes) + list(vocab.styles)


def record_has(record: WorldRecord, concept: str, vocab: Optional[Vocabulary] = None) -> bool:
    """Ground truth: does the record's prompt ask for ``concept``?"""
    kind = concept_kind(concept, vocab)
    if kind == "object":
        return record.object == concept
    if kind == "scene":
        return record.scene == concept
    return record.style == concept


def balanced_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean of the hit rate on positives and the rejection rate on negatives (either alone if the other is empty)."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    rates = []
    if truth.any():
        rates.append(float(predicted[truth].mean()))
    if (~truth).any():
        rates.append(float((~predicted[~truth]).mean()))
    if not rates:
        raise ValueError("balanced_accuracy: no samples")
    return float(np.mean(rates))


def best_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The cut maximising balanced accuracy (present = score >= cut), centred in the widest tied gap."""
    scores, truth = np.asarray(scores, float), np.asarray(truth, bool)
    if not truth.any() or truth.all():
        raise ValueError("calibration needs both positive and negative samples of every concept")
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    pos, neg = scores[truth], scores[~truth]
    hit = (pos[None, :] >= cuts[:, None]).mean(axis=1)
    reject = (neg[None, :] < cuts[:, None]).mean(axis=1)
    bacc = (hit + reject) / 2
    best = np.flatnonzero(np.isclose(bacc, bacc.max()))
    # among tied cuts, the one with the widest gap between neighbouring scores is the most robust
    lower = np.concatenate([[values[0]], values])[best]
    upper = np.concatenate([values, [values[-1]]])[best]
    widest = int(np.argmax(upper - lower))
    return float(cuts[best[widest]])


class ConceptClassifier:
    """Scores and thresholds for every object, scene and style of the world."""

    def __init__(self, layout: CodeLayout, grid_side: int, window: int, vocab: Optional[Vocabulary] = None):
        self.layout = layout
        self.grid_side = grid_side
        self.window = window
        self.vocab = vocab or planted()
        self.concepts = all_concepts(self.vocab)
        self.thresholds: dict[str, float] = {}
        self._group = layout.group_of_code()
        self._block = layout.block_of_code()

    def _check(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        n_tokens = self.grid_side ** 2
        if tokens.ndim != 2 or tokens.shape[1] != n_tokens:
            raise ValueError(f"image tokens: expected shape [N, {n_tokens}] (grid {self.grid_side}x{self.grid_side}), "
                             f"got {list(tokens.shape)}")
        bad = (tokens < 0) | (tokens >= self.layout.codebook_size)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise ValueError(f"image tokens: sample {i}, position {j} holds code {int(tokens[i, j])}, "
                             f"outside the codebook [0, {self.layout.codebook_size})")
        return tokens.astype(np.int64)

    def scores(self, tokens) -> dict[str, np.ndarray]:
        """Per concept, a float score per image (tokens: [N, side*side] codes)."""
        tokens = self._check(tokens)
        n, side, win = tokens.shape[0], self.grid_side, self.window
        groups = self._group[tokens].reshape(n, side, side)
        blocks = self._block[tokens]
        names = self.layout.group_names
        out: dict[str, np.ndarray] = {}
        for concept in self.vocab.objects:
            mask = (groups == names.index(concept)).astype(np.float64)
            csum = np.zeros((n, side + 1, side + 1))
            csum[:, 1:, 1:] = mask.cumsum(1).cumsum(2)
            windows = csum[:, win:, win:] - csum[:, :-win, win:] - csum[:, win:, :-win] + csum[:, :-win, :-win]
            out[concept] = windows.reshape(n, -1).max(axis=1) / (win * win)
        for concept in self.vocab.scenes:
            out[concept] = (groups == names.index(concept)).reshape(n, -1).mean(axis=1)
        for i, concept in enumerate(self.vocab.styles):
            out[concept] = (blocks == 1 + i).mean(axis=1)
        return out

    def predict(self, tokens) -> dict[str, np.ndarray]:
        """Per concept, a bool per image: is the concept shown?"""
        if not self.thresholds:
            raise RuntimeError("the classifier is not calibrated: call calibrate(tokens, records) first")
        return {c: s >= self.thresholds[c] for c, s in self.scores(tokens).items()}

    def calibrate(self, tokens, records: Sequence[WorldRecord]) -> dict[str, float]:
        """Set every threshold from rendered images with known attributes; returns the thresholds."""
        scores = self.scores(tokens)
        if len(records) != len(next(iter(scores.values()))):
            raise ValueError(f"calibrate: {len(records)} records for {len(next(iter(scores.values())))} images")
        self.thresholds = {
            c: best_threshold(scores[c], np.array([record_has(r, c, self.vocab) for r in records])) for c in self.concepts
        }
        return dict(self.thresholds)

    def accuracy(self, tokens, records: Sequence[WorldRecord], concepts: Optional[Sequence[str]] = None) -> dict[str, float]:
        """Balanced accuracy per concept, plus one entry per word of a concept with several, e.g.
        ``church (chapel)`` (objects and styles alike).

        A word entry counts as positives only the prompts that used that word, and as
        negatives every prompt without the concept. Entries with no positives are left out.
        """
        predicted = self.predict(tokens)
        out: dict[str, float] = {}
        for concept in concepts or self.concepts:
            kind = concept_kind(concept, self.vocab)
            truth = np.array([record_has(r, concept, self.vocab) for r in records])
            if not truth.any():
                continue
            out[concept] = balanced_accuracy(predicted[concept], truth)
            words = self.vocab.all_words(concept) if kind in ("object", "style") else ()
            if len(words) > 1:
                for word in words:
                    used = np.array([_uses_word(r, kind, concept, word, words[0]) for r in records])
                    if not used.any():
                        continue
                    keep = used | ~truth
                    out[f"{concept} ({word})"] = balanced_accuracy(predicted[concept][keep], truth[keep])
        return out


def _uses_word(record: WorldRecord, kind: str, concept: str, word: str, canonical: str) -> bool:
    """Whether the record names ``concept`` by ``word`` (a style's canonical name is stored as None)."""
    if kind == "object":
        return record.object == concept and record.object_word == word
    return record.style == concept and (record.style_word or canonical) == word
