"""The concepts of a world and the words that name them, split by use.

Every caller that needs "which concepts does this world have" or "which words may a
training pair, a settings choice or the final evaluation use for this concept" asks here,
never the grammar's tables directly, so a world with another vocabulary answers for itself:

- ``train``: the words erasure pairs may use (what a user lists with the concept:
  "church"; in a generated world the canonical word and one synonym);
- ``validation``: words kept out of training and used only to choose settings (none in the
  planted world, one per concept in a generated world);
- ``heldout``: words used only by the final evaluation ("chapel", "cathedral").

The answers come from the world's vocabulary (``World.vocab``, ``ear_dist.world.vocabulary``).

The three splits of a concept never overlap.
"""

from __future__ import annotations

from ear_dist.world.vocabulary import WORD_SPLITS, Vocabulary

__all__ = ["WORD_SPLITS", "world_concepts", "object_concepts", "style_concepts", "concept_words", "all_concept_words"]


def _vocab(world) -> Vocabulary:
    """The world's vocabulary (a ``World`` or ``VarWorld``; None: the planted world's)."""
    if world is None:
        from ear_dist.world.vocabulary import planted

        return planted()
    return world.vocab


def world_concepts(world) -> list[str]:
    """Every object and style concept of the world (objects first), in the grammar's order."""
    return _vocab(world).concepts


def object_concepts(world) -> list[str]:
    return list(_vocab(world).objects)


def style_concepts(world) -> list[str]:
    return list(_vocab(world).styles)


def concept_words(world, concept: str, split: str) -> tuple[str, ...]:
    """The words of ``concept`` in one split (see the module docstring; a style's names lowercased)."""
    return _vocab(world).words(concept, split)


def all_concept_words(world, concepts) -> list[str]:
    """Every word of ``concepts`` over the splits (train, validation, held out), each once: what an attack or an
    adversarial search must leave out."""
    return list(dict.fromkeys(w for c in concepts for split in WORD_SPLITS for w in concept_words(world, c, split)))
