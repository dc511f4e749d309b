"""The planted-concept world as an eval suite (``ear-dist eval --suite world[:concept]``).

Held-out sentence templates and the synonyms, none of which appear in a training pair:

- concept groups: ``held-out sentences (<word>)`` for each word of an object concept
  ("church": the test prompts; "chapel", "cathedral": synonyms), or ``held-out sentences``
  for a style;
- preservation groups: the other objects' own prompts without style (for a style: the
  other style and three objects), each judged on its own concept;
- ``unrelated``: prompts of the other objects, whose image-code histogram should not move.

Images are judged on their tokens by the world's calibrated classifier and drawn in the
world's colours. Seeds are fixed per group (``stream * 100000 + i``), so the demo and
``ear-dist eval`` sample the very same images.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ear_dist.config import Config
from ear_dist.eval.suites import EvalPrompt, Suite, SuiteError
from ear_dist.world.colour import grid_to_image
from ear_dist.world.var_world import world_for
from ear_dist.world.world import World

EVAL_STREAM = 101
UNRELATED = "unrelated"


def world_groups(concept: str, world=None) -> tuple[dict, dict, dict]:
    """(concept groups, preservation groups, unrelated sampling) as ``World.sample`` keyword arguments, in
    ``world``'s vocabulary (default: the planted world's).

    The first concept group is the test group (the canonical word on held-out sentences); the others
    are the concept's held-out words (synonyms the training pairs never use). A planted style has one
    name: one group."""
    from ear_dist.world.concepts import concept_words
    from ear_dist.world.vocabulary import planted

    vocab = world.vocab if world is not None else planted()
    objects, styles = vocab.objects, vocab.styles
    if concept in objects:
        words = (objects[concept][0], *concept_words(world, concept, "heldout"))
        groups = {f"held-out sentences ({w})": dict(objects=[concept], object_words=[w]) for w in words}
        others = {o: dict(objects=[o], styles=[None]) for o in objects if o != concept}
        unrelated = dict(objects=[o for o in objects if o != concept])
    elif concept in styles:
        names = vocab.all_words(concept)
        if len(names) == 1:
            groups = {"held-out sentences": dict(styles=[concept])}
        else:
            words = (names[0], *concept_words(world, concept, "heldout"))
            groups = {f"held-out sentences ({w})": dict(style_words=[w]) for w in words}
        others = {s: dict(styles=[s]) for s in styles if s != concept}
        others.update({o: dict(objects=[o], styles=[None]) for o in list(objects)[:3]})
        unrelated = dict(styles=[None])
    else:
        raise SuiteError(f"suite world:{concept}: the world's concepts are {', '.join(vocab.concepts)}")
    return groups, others, unrelated


def world_suite(cfg: Config, concept: str = "", world: Optional[World] = None) -> Suite:
    """The world suite for ``concept`` (default ``erase.concept``), ``eval.world_prompts`` prompts per group;
    the world of ``model.family`` (a VAR model's images are judged and drawn by their finest scale)."""
    from ear_dist.world.pretrain import model_build_info, refuse_missed_target

    # a world model that missed its pretraining target measures its own gaps, not the erasure: refused
    refuse_missed_target(model_build_info(cfg.model.path), cfg.world, f"suite world ({cfg.model.path})")
    concept = (concept or cfg.erase.concept).strip()
    world = world or world_for(cfg.world, cfg.model.family)
    if concept not in world.vocab.concepts:
        concept = concept.lower()
    n = cfg.eval.world_prompts
    groups, others, unrelated = world_groups(concept, world)
    prompts: list[EvalPrompt] = []

    def add(stream: int, group: str, role: str, judged_on: str, kw: dict, kind: str = "") -> None:
        batch = world.sample(n, split="heldout", stream=stream, **kw)
        prompts.extend(EvalPrompt(p, stream * 100000 + i, group, role, judged_on, kind)
                       for i, p in enumerate(batch.prompts))

    for g, (name, kw) in enumerate(groups.items()):  # the canonical word first: the test prompts
        add(EVAL_STREAM + g, name, "concept", concept, kw, "test" if g == 0 else "synonym")
    for g, (other, kw) in enumerate(others.items()):
        add(EVAL_STREAM + 50 + g, other, "preservation", other, kw)
    add(EVAL_STREAM + 99, UNRELATED, "unrelated", "", unrelated)

    def classify_tokens(tokens: np.ndarray, concepts) -> list[bool]:
        shown = world.classify(tokens)
        return [bool(shown[c][i]) for i, c in enumerate(concepts)]

    def render(tokens: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(grid_to_image(t, world.layout, world.config.grid_side).convert("RGB"))
                         for t in world.image_grid(tokens)])

    info = {"classifier": "world", "model": f"calibrated token-grid classifier of world {world.config_hash}",
            "thresholds": {c: round(t, 4) for c, t in world.classifier.thresholds.items()}}
    return Suite(f"world-{concept.replace(' ', '-')}", prompts, f"world {world.config_hash}", concept,
                 classify_tokens=classify_tokens, render=render, render_id=f"world-glyphs:{world.config_hash}",
                 classifier_info=info,
                 token_shape=(world.config.grid_side ** 2, world.config.codebook_size)
                 if cfg.model.family == "janus" else None)
