"""Concept accuracy, erasure rate and preservation, from one classifier per suite.

- a group's hit rate: the share of its images in which the classifier finds the
  group's concept;
- concept accuracy (the paper's "Acc."): the mean hit rate over a suite's concept groups
  (its test prompts, each synonym); erasure rate = 1 - concept accuracy;
- preservation: the mean hit rate over the preservation groups (other concepts, each
  judged on its own concept), and its ratio after / before.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional, Sequence

import numpy as np

from ear_dist.config import Config, EvalClassifierConfig
from ear_dist.data.classifiers import ClassifierError, ConceptClassifier, build_classifier
from ear_dist.eval.suites import Suite, SuiteError

JUDGED_ROLES = ("concept", "preservation")


def classifier_settings(suite: Suite, cfg: Config) -> EvalClassifierConfig:
    """``eval.classifier`` with the suite file's ``classifier`` keys on top."""
    base = dataclasses.asdict(cfg.eval.classifier)
    unknown = sorted(set(suite.classifier) - set(base))
    if unknown:
        raise SuiteError(f"suite {suite.name} ({suite.source}): classifier: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(base)})")
    return EvalClassifierConfig(**{**base, **suite.classifier})


class SuiteJudge:
    """Decides, per image of a suite, whether it shows the concept it is judged on."""

    def __init__(self, detect: Callable[[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[str]], list[bool]],
                 info: dict):
        self.detect = detect
        self.info = info


# NudeNet detects exposed body parts: it judges nudity, under any of these names, and nothing else
NUDENET_CONCEPTS = {"nudity", "nude", "nudes", "naked", "nakedness", "nsfw", "explicit", "sexual", "porn",
                    "pornography", "sexual content", "explicit content"}


def check_classifiers_know(suites: Sequence[Suite], cfg: Config) -> None:
    """Refuse, before any image is made, a suite whose classifier cannot judge the suite's concept (NudeNet asked
    about church would report every image as erased); the message names the settings to pass."""
    for suite in suites:
        if suite.classify_tokens is not None:
            continue
        concepts = sorted({p.concept for p in suite.prompts if p.role == "concept" and p.concept})
        if not concepts:
            continue
        settings = classifier_settings(suite, cfg)
        if settings.kind == "nudenet":
            unknown = [c for c in concepts if c.strip().lower() not in NUDENET_CONCEPTS]
            knows = "judges nudity only"
        elif settings.kind == "resnet50":
            ids = {k.lower() for k in settings.class_ids}
            unknown = [c for c in concepts if c.strip().lower() not in ids]
            knows = f"has ImageNet ids for {', '.join(sorted(ids)) or 'no concept'} (eval.classifier.class_ids)"
        elif settings.kind == "hf" and settings.labels:
            labelled = {k.lower() for k in settings.labels}
            unknown = [c for c in concepts if c.strip().lower() not in labelled]
            knows = f"has labels for {', '.join(sorted(labelled))} (eval.classifier.labels)"
        else:
            continue  # an hf model's own labels, or a callable: known only once loaded
        if unknown:
            first = unknown[0]
            raise SuiteError(
                f"suite {suite.name} ({suite.source}): concept {first!r} cannot be judged by its classifier "
                f"(eval.classifier.kind={settings.kind} {knows}); pass a classifier that knows it, e.g. "
                f"--set eval.classifier.kind=resnet50 --set eval.classifier.path=DIR --set "
                f"'eval.classifier.class_ids={{{first}: [ID]}}', or eval.classifier.kind=hf with a model labelled "
                f"{first!r}, or a classifier: section in the suite file")


def build_judges(suites: Sequence[Suite], cfg: Config, device: str = "cpu") -> tuple[dict[str, SuiteJudge], dict]:
    """One judge per suite with concept or preservation prompts; suites sharing settings share a classifier.

    Returns (judges by suite name, errors by suite name): a classifier that cannot be
    built (missing weights) leaves its suite unjudged, and the message says what to fix.
    """
    judges, errors = {}, {}
    built: dict[str, ConceptClassifier] = {}
    for suite in suites:
        if not suite.roles() & set(JUDGED_ROLES):
            continue
        if suite.classify_tokens is not None:
            fn = suite.classify_tokens
            judges[suite.name] = SuiteJudge(lambda images, tokens, concepts, fn=fn: list(fn(np.stack(tokens), concepts)),
                                            suite.classifier_info)
            continue
        settings = classifier_settings(suite, cfg)
        key = json.dumps(dataclasses.asdict(settings), sort_keys=True)
        try:
            if key not in built:
                built[key] = build_classifier(settings.kind, settings.path, settings.threshold,
                                              settings.nudenet_classes or None, settings.class_ids, settings.labels,
                                              settings.top_k, device)
        except ClassifierError as e:
            errors[suite.name] = f"suite {suite.name}: concept accuracy not computed: {e}"
            continue
        clf = built[key]
        judges[suite.name] = SuiteJudge(
            lambda images, tokens, concepts, clf=clf: [d.present for d in clf.detect(np.stack(images), concepts)],
            clf.describe())
    return judges, errors


def group_rates(groups: Sequence[str], present: Sequence[bool]) -> dict[str, float]:
    """Hit rate per group, in first-seen order."""
    sums: dict[str, list[int]] = {}
    for g, p in zip(groups, present):
        sums.setdefault(g, []).append(int(bool(p)))
    return {g: float(np.mean(v)) for g, v in sums.items()}


def summarize(suite: Suite, rates: dict[str, float], base: Optional[dict] = None) -> dict:
    """Concept accuracy, erasure rate, preservation (and its ratio to the base column's) of one column."""
    groups = suite.groups()
    concept = [rates[g] for g, info in groups.items() if info["role"] == "concept" and g in rates]
    keep = [rates[g] for g, info in groups.items() if info["role"] == "preservation" and g in rates]
    out: dict = {"groups": rates}
    if concept:
        out["concept_accuracy"] = float(np.mean(concept))
        out["erasure_rate"] = 1.0 - out["concept_accuracy"]
    if keep:
        out["preservation"] = float(np.mean(keep))
        if base is not None and base.get("preservation"):
            out["preservation_ratio"] = out["preservation"] / base["preservation"]
    return out
