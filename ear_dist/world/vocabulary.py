"""A world's vocabulary: its concepts, the words that name them, and its sentence templates.

Two presets (``world.vocabulary``):

- ``planted`` (the default): seven objects, two styles, five scenes; only "church" has
  synonyms ("chapel", "cathedral"). Its tables are ``ear_dist.world.grammar``'s module
  constants, unchanged, so the planted world is the world it always was (same hash, same
  prompts, same images).
- ``generated``: ``world.objects`` objects and ``world.styles`` styles named by seeded
  pronounceable pseudo-words ("dovara", "kesil"), every one with a canonical word and
  ``world.synonyms`` synonyms (a style's names are used as "in the style of <name>"). The
  words are a function of ``world.seed`` alone.

Per concept the words are split, never overlapping:

- ``train``: what erasure pairs may use, what a user lists with the concept ("church,
  chapel"): the canonical word (planted: alone; generated: with one synonym);
- ``validation``: words kept out of training to choose settings (generated: one);
- ``heldout``: words only the final evaluation sees (the rest).

Sentence templates split the same way: ``train`` templates for pairs, ``validation``
templates for choosing settings (generated worlds only) and ``heldout`` templates for the
evaluation.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ear_dist.errors import InputError

WORD_SPLITS = ("train", "validation", "heldout")
VOCABULARIES = ("planted", "generated")
STYLE_PHRASE = "in the style of {}"

# The generated world's extra sentence shapes for choosing settings (neither trained on nor evaluated).
VALIDATION_TEMPLATES: tuple[str, ...] = (
    "a drawing of {np} {scene} {style}",
    "{np} shown {scene} {style}",
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_WORDS_STREAM = 0x766F63  # "voc": the generated words' own random stream of the world seed


class WorldSettingError(InputError, ValueError):
    """A world setting no world can be built from (one line naming the world.* key, exit 2)."""


@dataclass(eq=False)
class Vocabulary:
    """Concepts, words and templates of one world (see the module docstring)."""

    kind: str
    objects: dict[str, tuple[str, ...]]  # concept -> words, the first canonical
    styles: dict[str, tuple[str, ...]]  # concept -> names, the first canonical ("Van Gogh")
    scenes: dict[str, str]  # concept -> phrase
    adjectives: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    validation_templates: tuple[str, ...] = ()
    # concept -> split -> words (style names lowercased); filled by __post_init__ when empty
    splits: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    _regex: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.splits:
            self.splits = default_splits(self.objects, self.styles)
        clash = set(self.objects) & (set(self.styles) | set(self.scenes)) | set(self.styles) & set(self.scenes)
        if clash:
            raise ValueError(f"vocabulary: {sorted(clash)} name two kinds of concept")
        for concept, parts in self.splits.items():
            seen: set[str] = set()
            for split in WORD_SPLITS:
                both = seen & set(parts[split])
                if both:
                    raise ValueError(f"vocabulary: {concept!r} has {sorted(both)} in two word splits")
                seen |= set(parts[split])

    # ------------------------------------------------------------------ concepts and words

    @property
    def concepts(self) -> list[str]:
        """Objects, then styles (the concepts a user may erase)."""
        return list(self.objects) + list(self.styles)

    def words(self, concept: str, split: str) -> tuple[str, ...]:
        """The words of ``concept`` in one word split (style names lowercased)."""
        if split not in WORD_SPLITS:
            raise ValueError(f"word split {split!r}: expected one of {', '.join(WORD_SPLITS)}")
        if concept not in self.splits:
            raise ValueError(f"concept {concept!r}: the world's concepts are {', '.join(self.concepts)}")
        return self.splits[concept][split]

    def all_words(self, concept: str) -> tuple[str, ...]:
        """Every word of a concept, the canonical first (style names lowercased)."""
        if concept in self.objects:
            return self.objects[concept]
        return tuple(n.lower() for n in self.styles[concept])

    def style_name(self, concept: str, word: Optional[str]) -> str:
        """The name of a style as written in a prompt (``word`` None: the canonical name)."""
        names = self.styles[concept]
        if word is None:
            return names[0]
        for name in names:
            if name.lower() == word.lower():
                return name
        raise ValueError(f"style {concept!r} has no name {word!r} (names: {', '.join(names)})")

    def style_phrase(self, concept: str, word: Optional[str] = None) -> str:
        return STYLE_PHRASE.format(self.style_name(concept, word))

    def template_table(self, split: str) -> tuple[str, ...]:
        table = {"train": self.train_templates, "heldout": self.heldout_templates,
                 "validation": self.validation_templates}.get(split)
        if table is None:
            raise ValueError(f"template split {split!r}: expected train, validation or heldout")
        return table

    # ------------------------------------------------------------------ identity and tokens

    def describe(self) -> dict:
        """Everything that determines the vocabulary, as plain JSON-able data (the planted world's keys unchanged)."""
        out = {
            "objects": {k: list(v) for k, v in self.objects.items()},
            "scenes": dict(self.scenes),
            "adjectives": list(self.adjectives),
            "train_templates": list(self.train_templates),
            "heldout_templates": list(self.heldout_templates),
        }
        if self.kind == "planted":
            out["styles"] = {k: self.style_phrase(k) for k in self.styles}
        else:
            out.update(vocabulary=self.kind, styles={k: list(v) for k, v in self.styles.items()},
                       validation_templates=list(self.validation_templates),
                       splits={c: {s: list(w) for s, w in parts.items()} for c, parts in self.splits.items()})
        return out

    def tokens(self) -> list[str]:
        """Every word any prompt can contain, lowercased, sorted (the tiny model's tokenizer words)."""
        words: set[str] = set(template_words(self.train_templates + self.heldout_templates
                                             + self.validation_templates))
        for surfaces in self.objects.values():
            words.update(surfaces)
        words.update(self.adjectives)
        words.update(("a", "an"))
        phrases = list(self.scenes.values()) + [self.style_phrase(c, n) for c, ns in self.styles.items() for n in ns]
        for phrase in phrases:
            words.update(phrase.lower().split())
        return sorted(words)


def template_words(templates) -> set[str]:
    """The fixed words of sentence templates (slots removed), lowercased."""
    words: set[str] = set()
    for template in templates:
        words.update(re.sub(r"\{\w+\}", " ", template).lower().split())
    return words


def default_splits(objects: dict, styles: dict) -> dict[str, dict[str, tuple[str, ...]]]:
    """The planted split: the canonical word trains, the synonyms are held out, nothing validates."""
    out = {c: {"train": ws[:1], "validation": (), "heldout": tuple(ws[1:])} for c, ws in objects.items()}
    for c, names in styles.items():
        lower = tuple(n.lower() for n in names)
        out[c] = {"train": lower[:1], "validation": (), "heldout": lower[1:]}
    return out


def generated_splits(words: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Canonical + one synonym train, one synonym validates, the rest (at least one) are held out."""
    if len(words) < 4:
        raise ValueError(f"a generated concept needs a canonical word and >= 3 synonyms, got {list(words)}")
    return {"train": words[:2], "validation": words[2:3], "heldout": words[3:]}


def pseudo_words(rng: np.random.Generator, n: int, reserved: set[str]) -> list[str]:
    """``n`` distinct pronounceable words (2-3 consonant-vowel syllables, maybe a final consonant), none in
    ``reserved``."""
    out: list[str] = []
    taken = set(reserved)
    while len(out) < n:
        syllables = int(rng.integers(2, 4))
        word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(syllables))
        if rng.random() < 0.3:
            word += _CONSONANTS[rng.integers(len(_CONSONANTS))]
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


@functools.lru_cache(maxsize=None)
def planted() -> Vocabulary:
    """The planted world's vocabulary: ``ear_dist.world.grammar``'s tables (one shared instance)."""
    from ear_dist.world import grammar as g

    return Vocabulary("planted", dict(g.OBJECTS), {k: (g.STYLE_NAMES[k],) for k in g.STYLES}, dict(g.SCENES),
                      g.ADJECTIVES, g.TRAIN_TEMPLATES, g.HELDOUT_TEMPLATES)


@functools.lru_cache(maxsize=32)
def generated(seed: int, objects: int = 40, styles: int = 10, synonyms: int = 3) -> Vocabulary:
    """A seeded vocabulary of ``objects`` objects and ``styles`` styles, each with ``synonyms`` synonyms; scenes,
    adjectives, training and held-out templates are the planted world's, plus validation templates."""
    from ear_dist.world import grammar as g

    if objects < 2 or styles < 1:
        raise WorldSettingError(f"world.objects={objects}, world.styles={styles}: a generated world needs >= 2 objects "
                         "and >= 1 style")
    if synonyms < 3:
        raise WorldSettingError(f"world.synonyms={synonyms}: a generated concept needs >= 3 synonyms (one more trains, one "
                         "validates, the rest are held out)")
    reserved = template_words(g.TRAIN_TEMPLATES + g.HELDOUT_TEMPLATES + VALIDATION_TEMPLATES)
    reserved |= set(g.ADJECTIVES) | {"a", "an"} | template_words([STYLE_PHRASE.format("")])
    reserved |= {w for phrase in g.SCENES.values() for w in phrase.split()} | set(g.SCENES)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _WORDS_STREAM]))
    per = 1 + synonyms
    words = pseudo_words(rng, (objects + styles) * per, reserved)
    groups = [tuple(words[i * per:(i + 1) * per]) for i in range(objects + styles)]
    object_table = {ws[0]: ws for ws in groups[:objects]}
    style_table = {ws[0]: ws for ws in groups[objects:]}
    splits = {c: generated_splits(ws) for c, ws in {**object_table, **style_table}.items()}
    return Vocabulary("generated", object_table, style_table, dict(g.SCENES), g.ADJECTIVES, g.TRAIN_TEMPLATES,
                      g.HELDOUT_TEMPLATES, VALIDATION_TEMPLATES, splits)


def vocabulary_for(config) -> Vocabulary:
    """The vocabulary a ``WorldConfig`` asks for."""
    kind = getattr(config, "vocabulary", "planted")
    if kind == "planted":
        return planted()
    if kind == "generated":
        return generated(config.seed, config.objects, config.styles, config.synonyms)
    raise WorldSettingError(f"world.vocabulary={kind!r}: expected one of {', '.join(VOCABULARIES)}")
