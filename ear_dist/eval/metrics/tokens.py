"""How far a model's image-token distribution moved: histograms of codes, total variation and KL.

Both carry a large sampling floor: two samples of the very same distribution (20 images of
576 tokens) are already TV ~0.27 / KL ~0.9 apart, and KL depends on ``KL_SMOOTHING``. The
report prints each value beside its floor, ``token_floor``: the same distances between two
disjoint halves of the base column's own images (even and odd positions). The halves hold
half the images each, so the floor at the full count is somewhat lower (TV ~ 1/sqrt(images)).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

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


def token_floor(token_rows: Sequence[np.ndarray], codebook_size: int) -> Optional[dict]:
    """TV and KL between two disjoint halves (even / odd positions) of one column's images: the values a
    model gets for no change at all. None with fewer than 2 images."""
    if len(token_rows) < 2:
        return None
    first = token_histogram(token_rows[0::2], codebook_size)
    second = token_histogram(token_rows[1::2], codebook_size)
    return {"tv": total_variation(second, first), "kl": kl_divergence(first, second),
            "images_per_half": len(token_rows) // 2, "kl_smoothing": KL_SMOOTHING}
