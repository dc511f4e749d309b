"""The concepts of a world and the words that name them, split by use.

Every caller that needs "which concepts does this world have" or "which words may a
training pair, a settings choice or the final evaluation use for this concept" asks here,
never the grammar's tables directly, so a world with another vocabulary answers for itself:

- ``train``: the words erasure pairs may use (what a user lists with the concept:
  "church");
- ``validation``: words kept out of training and used only to choose settings;
- ``heldout``: words used only by the final evaluation ("chapel", "cathedral").

The three splits of a concept never overlap.
"""

from __future__ import annotations

from ear_dist.world.grammar import OBJECTS, STYLES

WORD_SPLITS = ("train", "validation", "heldout")


def world_concepts(world) -> list[str]:
    """Every object and style concept of the world (objects first), in the grammar's order."""
    return list(OBJECTS) + list(STYLES)


def object_concepts(world) -> list[str]:
    return list(OBJECTS)


def style_concepts(world) -> list[str]:
    return list(STYLES)


def concept_words(world, concept: str, split: str) -> tuple[str, ...]:
    """The words of ``concept`` in one split (see the module docstring)."""
    if split not in WORD_SPLITS:
        raise ValueError(f"word split {split!r}: expected one of {', '.join(WORD_SPLITS)}")
    if concept in OBJECTS:
        words = OBJECTS[concept]
        return {"train": words[:1], "validation": (), "heldout": words[1:]}[split]
    if concept in STYLES:
        return {"train": (concept,), "validation": (), "heldout": ()}[split]
    raise ValueError(f"concept {concept!r}: the world's concepts are {', '.join(world_concepts(world))}")
