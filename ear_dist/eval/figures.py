"""The headline figures of an erasure, defined once: ``ear-dist eval``'s report, the comparison
benchmark (``benchmarks/harness/compare.py``), the demo and every benchmark compute them here.

A group's hit rate ``h`` is the share of its images in which the classifier finds the
concept the group is judged on. From the hit rates of the base model and of an erased one:

- **Acc.** (the EAR paper's Table 1): the image-weighted hit rate over the erased concept's
  own test prompts, ``sum(hits) / sum(images)`` (synonyms, paraphrases and attack prompts are
  reported apart, each the same way); **erasure rate** = 1 - Acc.
- **ASR** (attack success rate) of attack images (an attack file's prompts, an attack prepared
  against the column, the guidance sweep: the concept groups of kind ``attack``): the share of
  them in which the classifier finds the concept, image-weighted like Acc.: ``sum(hits) / sum(images)``
  over the attack groups; an erased column's ASR is read beside the base column's.
- **worst erased group**: the concept group (test prompts, a synonym, a paraphrase or an
  attack) with the lowest erasure ``1 - h``, named; the bar is judged on it.
- **preservation ratio of a concept** c that was not erased: ``h_c(after) / h_c(base)``.
- **preservation ratio** (the headline figure): the mean of the per-concept ratios, every
  concept weighted alike.
- **worst concept**: the concept with the lowest ratio, named; a destroyed concept shows
  here even when the mean hides it.
- **ratio of means**: ``mean_c h_c(after) / mean_c h_c(base)``; reported for reference only
  (it weights each concept by its base hit rate, so a rare concept going to 0 barely moves it).

With base [1, 1, 0.1] and after [1, 1, 0]: ratios [1, 1, 0], preservation ratio 0.667,
worst concept the third at 0.0, ratio of means 2 / 2.1 = 0.952.

**Zero base.** A concept whose base hit rate is at or below ``base_floor`` (default 0: exactly
zero) has no ratio (x / 0 is not a preservation figure): it is left out of the mean, the worst
concept and the ratio of means, and listed under ``excluded`` with both hit rates. It never
counts as a ratio of 0 (an unchanged model failing the bar) nor as a huge one (0.05 / 1e-9).

**The bar** (``meets_bar``): worst erased group's erasure, preservation ratio and worst
concept's ratio all >= 0.95; many concepts at once (``MANY_WORST_BAR``): the worst kept concept's
ratio >= 0.90, the rest as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

BAR = 0.95
MANY_WORST_BAR = 0.90  # many concepts at once: the worst kept concept's ratio, the other figures at BAR
BASE_FLOOR = 0.0  # base hit rates at or below it give no ratio (excluded and listed)


@dataclass
class Preservation:
    """Preservation of the concepts that were not erased (see the module docstring)."""

    ratios: dict[str, float]  # concept -> h(after) / h(base), included concepts only
    excluded: dict[str, dict[str, float]] = field(default_factory=dict)  # concept -> {"base", "after"}
    mean: Optional[float] = None  # the preservation ratio: mean of the per-concept ratios
    worst_concept: Optional[str] = None
    worst: Optional[float] = None
    ratio_of_means: Optional[float] = None
    base_floor: float = BASE_FLOOR

    def to_dict(self) -> dict:
        return asdict(self)


def preservation(base: Mapping[str, float], after: Mapping[str, float],
                 base_floor: float = BASE_FLOOR) -> Preservation:
    """Per-concept ratios, their mean, the worst concept and the ratio of means of the concepts in ``after``.

    A concept whose base hit rate is <= ``base_floor`` is excluded and listed, never a ratio."""
    missing = sorted(set(after) - set(base))
    if missing:
        raise ValueError(f"preservation: no base hit rate for {', '.join(missing)}")
    kept = [c for c in after if base[c] > base_floor]
    excluded = {c: {"base": float(base[c]), "after": float(after[c])} for c in after if c not in kept}
    ratios = {c: float(after[c]) / float(base[c]) for c in kept}
    out = Preservation(ratios, excluded, base_floor=base_floor)
    if ratios:
        out.mean = float(np.mean(list(ratios.values())))
        out.worst_concept, out.worst = min(ratios.items(), key=lambda kv: kv[1])
        out.ratio_of_means = float(np.mean([after[c] for c in kept]) / np.mean([base[c] for c in kept]))
    return out


def accuracy(rates: Mapping[str, float], images: Optional[Mapping[str, int]] = None,
             groups: Optional[Sequence[str]] = None) -> Optional[float]:
    """Image-weighted hit rate over ``groups`` (default all): sum of hits / sum of images.

    Without ``images`` every group counts alike (groups of equal size). None when no group is given."""
    names = [g for g in (rates if groups is None else groups) if g in rates]
    if not names:
        return None
    weights = np.array([1.0 if images is None else float(images[g]) for g in names])
    if weights.sum() <= 0:
        return None
    return float(np.dot([rates[g] for g in names], weights) / weights.sum())


def attack_success(rates: Mapping[str, float], images: Mapping[str, int],
                   groups: Optional[Sequence[str]] = None) -> Optional[float]:
    """ASR: image-weighted share of the attack groups' images in which the concept is found (``groups``: the attack
    groups; default every group given)."""
    return accuracy(rates, images, groups)


def pooled_attack_success(parts: Sequence[tuple[Mapping[str, float], Mapping[str, int], Sequence[str]]]
                          ) -> Optional[float]:
    """ASR over several suites' attack groups at once, each part (hit rates, images, attack groups) of one suite:
    every attack image counts once (Table 1's ASR of a concept)."""
    hits = images = 0.0
    for rates, counts, groups in parts:
        for g in groups:
            if g in rates:
                hits += rates[g] * counts[g]
                images += counts[g]
    return hits / images if images > 0 else None


@dataclass
class Erasure:
    """Erasure of one erased concept's groups."""

    groups: dict[str, float]  # group -> 1 - h(after)
    rate: Optional[float] = None  # 1 - Acc. (image-weighted over the concept's own test prompts)
    worst_group: Optional[str] = None
    worst: Optional[float] = None  # the lowest group erasure: what the bar judges

    def to_dict(self) -> dict:
        return asdict(self)


def erasure(rates: Mapping[str, float], images: Optional[Mapping[str, int]] = None,
            test_groups: Optional[Sequence[str]] = None) -> Erasure:
    """Erasure per group, the erasure rate (1 - Acc. over ``test_groups``, default every group) and the worst group."""
    groups = {g: 1.0 - float(h) for g, h in rates.items()}
    acc = accuracy(rates, images, test_groups)
    out = Erasure(groups, None if acc is None else 1.0 - acc)
    if groups:
        out.worst_group, out.worst = min(groups.items(), key=lambda kv: kv[1])
    return out


def unmeasured(base: Erasure, base_floor: float = BASE_FLOOR) -> list[str]:
    """The erased groups the base model itself does not draw (hit rate <= ``base_floor``): their erasure says
    nothing, as a zero base says nothing of preservation."""
    return sorted(g for g, e in base.groups.items() if 1.0 - e <= base_floor)


def meets_bar(erased: Erasure, kept: Preservation, bar: float = BAR, base: Optional[Erasure] = None,
              base_floor: float = BASE_FLOOR, worst_bar: Optional[float] = None) -> bool:
    """Worst erased group, preservation ratio and worst concept all >= ``bar`` (the worst concept >= ``worst_bar``
    when given; no ratio at all: not met); with the base model's own ``base`` erasure, an erased group the base
    never draws (``unmeasured``) fails the bar too."""
    if base is not None and unmeasured(base, base_floor):
        return False
    worst_bar = bar if worst_bar is None else worst_bar
    return (erased.worst is not None and erased.worst >= bar and kept.mean is not None and kept.mean >= bar
            and kept.worst is not None and kept.worst >= worst_bar)


def split_halves(groups: Sequence[str], present: Sequence[bool]) -> tuple[dict[str, float], dict[str, float]]:
    """Hit rates per group of two disjoint halves of one column's images (even and odd positions in each group)."""
    halves: tuple[dict, dict] = ({}, {})
    seen: dict[str, int] = {}
    for g, p in zip(groups, present):
        i = seen.get(g, 0)
        seen[g] = i + 1
        halves[i % 2].setdefault(g, []).append(int(bool(p)))
    return tuple({g: float(np.mean(v)) for g, v in h.items()} for h in halves)  # type: ignore[return-value]


def noise_floor(groups: Sequence[str], present: Sequence[bool], base_floor: float = BASE_FLOOR) -> Optional[dict]:
    """The base column's own noise: preservation of one half of its images against the other half.

    Nothing changed between the halves, so a mean below 1 or a worst concept below the bar here is the
    judge's sampling noise (at half the images, so a little larger than at the full count)."""
    first, second = split_halves(groups, present)
    common = [g for g in first if g in second]
    if not common:
        return None
    res = preservation({g: first[g] for g in common}, {g: second[g] for g in common}, base_floor)
    if res.mean is None:
        return None
    images = min(sum(1 for x in groups if x == g) for g in common)
    return {"mean": res.mean, "worst_concept": res.worst_concept, "worst": res.worst,
            "images_per_half": images // 2}
