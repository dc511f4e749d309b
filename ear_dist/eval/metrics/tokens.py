"""How far a model's image-token distribution moved: histograms of codes, total variation and KL."""

from __future__ import annotations

from typing import Iterable

import numpy as np

# Additive smoothing for KL, so a code the base never drew does not make it infinite.
KL_SMOOTHING = 1e-6


def token_histogram(token_rows: Iterable[np.ndarray], codebook_size: int) -> np.ndarray:
    """Normalised histogram of the codes over all images' tokens."""
    counts = np.zeros(codebook_size, dtype=np.float64)
    for row in token_rows:
        counts += np.bincount(np.asarray(row, dtype=np.int64).ravel(), minlength=codebook_size)[:codebook_size]
    return counts / max(counts.sum(), 1.0)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """0.5 * sum |p - q|: 0 for the same distribution, 1 for disjoint ones."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def kl_divergence(p: np.ndarray, q: np.ndarray, smoothing: float = KL_SMOOTHING) -> float:
    """KL(p || q) in nats, both histograms smoothed by ``smoothing`` and renormalised."""
    p = np.asarray(p, dtype=np.float64) + smoothing
    q = np.asarray(q, dtype=np.float64) + smoothing
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())
