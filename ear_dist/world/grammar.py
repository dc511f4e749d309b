"""The world's language: objects, scenes, adjectives, styles and sentence templates.

Every prompt the world produces comes from one template filled with one object (the
noun), an optional adjective, an optional scene and an optional style phrase. The
templates are split in two: TRAIN_TEMPLATES are the sentence shapes that erasure
training pairs may use, HELDOUT_TEMPLATES are new sentence shapes kept for evaluation.
The synonyms of "church" ("chapel", "cathedral") appear in the world's full
distribution (what the model is pretrained on) but never in the ``train`` split, so an
erasure trained on "church" pairs is measured on words it never saw.

Records are plain data: the prompt text is always ``realize(record)``, so a pair's
surrogate is the same record with another object or no style, realised again.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

# concept -> surface words; the first word is the canonical one (the one erasure pairs use).
OBJECTS: dict[str, tuple[str, ...]] = {
    "church": ("church", "chapel", "cathedral"),
    "cinema": ("cinema",),
    "theater": ("theater",),
    "barn": ("barn",),
    "castle": ("castle",),
    "lighthouse": ("lighthouse",),
    "windmill": ("windmill",),
}

# scene concept -> phrase; a prompt without a scene gets a plain background.
SCENES: dict[str, str] = {
    "field": "in a field",
    "night": "at night",
    "sea": "by the sea",
    "city": "in the city",
    "snow": "in snow",
}

# style concept -> phrase; a style recolours the whole image.
STYLES: dict[str, str] = {
    "van gogh": "in the style of Van Gogh",
    "monet": "in the style of Monet",
}

# Size adjectives change how large the object is drawn; the others carry no visual meaning.
SIZE_ADJECTIVES: dict[str, str] = {"small": "small", "big": "big", "tall": "tall"}
ADJECTIVES: tuple[str, ...] = ("old", "small", "big", "tall", "quiet", "lonely", "famous")

# Slots: {np} noun phrase with article ("a small church"), {scene}, {style} (either may be empty).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{np} {scene} {style}",
    "a photo of {np} {scene} {style}",
    "a painting of {np} {scene} {style}",
    "a picture of {np} {scene} {style}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "an image showing {np} {scene} {style}",
    "{scene} there is {np} {style}",
    "a view of {np} {scene} {style}",
    "{np} seen {scene} {style}",
)

SPLITS = ("all", "train", "heldout")


@dataclass(frozen=True)
class WorldRecord:
    """One prompt and the attributes it was built from (what the renderer draws)."""

    prompt: str
    template: str  # "train/<i>" or "heldout/<i>"
    object: str  # concept name, a key of OBJECTS
    object_word: str  # the surface word used in the prompt (a synonym for "church" maybe)
    adjective: Optional[str] = None
    scene: Optional[str] = None  # a key of SCENES
    style: Optional[str] = None  # a key of STYLES

    def replace(self, **changes) -> "WorldRecord":
        """The same record with some attributes changed and the prompt realised again."""
        if "object" in changes and "object_word" not in changes:
            changes["object_word"] = OBJECTS[changes["object"]][0]
        rec = dataclasses.replace(self, **changes)
        return dataclasses.replace(rec, prompt=realize(rec))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def template_text(template_id: str) -> str:
    """The template string for an id such as ``train/2`` or ``heldout/0``."""
    split, _, index = template_id.partition("/")
    table = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}.get(split)
    if table is None or not index.isdigit() or int(index) >= len(table):
        raise ValueError(f"unknown template id {template_id!r} (expected train/0..{len(TRAIN_TEMPLATES) - 1} "
                         f"or heldout/0..{len(HELDOUT_TEMPLATES) - 1})")
    return table[int(index)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(object_word: str, adjective: Optional[str]) -> str:
    head = f"{adjective} {object_word}" if adjective else object_word
    return f"{_article(head)} {head}"


def realize(record: WorldRecord) -> str:
    """The prompt text of a record: its template filled with its attributes."""
    if record.object not in OBJECTS or record.object_word not in OBJECTS[record.object]:
        raise ValueError(f"record object {record.object!r} / word {record.object_word!r} is not in the grammar")
    text = template_text(record.template).format(
        np=noun_phrase(record.object_word, record.adjective),
        scene=SCENES[record.scene] if record.scene else "",
        style=STYLES[record.style] if record.style else "",
    )
    return " ".join(text.split())


def vocabulary() -> list[str]:
    """Every word any world prompt can contain, lowercased, sorted."""
    words: set[str] = set()
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        words.update(w for w in re.sub(r"\{\w+\}", " ", template).lower().split())
    for surfaces in OBJECTS.values():
        words.update(surfaces)
    words.update(ADJECTIVES)
    words.update(("a", "an"))
    for phrase in list(SCENES.values()) + list(STYLES.values()):
        words.update(phrase.lower().split())
    return sorted(words)


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    """A regex matching exactly the prompts this template can produce (for audits)."""
    alt = lambda xs: "|".join(re.escape(x) for x in sorted(xs, key=len, reverse=True))  # noqa: E731
    words = [w for ws in OBJECTS.values() for w in ws]
    np_re = rf"(?:a|an)(?: (?:{alt(ADJECTIVES)}))? (?:{alt(words)})"
    # Every piece ends in one space and the prompt is matched with a trailing space, so
    # optional slots (scene, style) vanish together with their separator.
    parts = []
    for token in template.split():
        if token == "{np}":
            parts.append(np_re + " ")
        elif token == "{scene}":
            parts.append(rf"(?:(?:{alt(SCENES.values())}) )?")
        elif token == "{style}":
            parts.append(rf"(?:(?:{alt(STYLES.values())}) )?")
        else:
            parts.append(re.escape(token) + " ")
    return re.compile("^" + "".join(parts) + "$")


def matching_templates(prompt: str) -> list[str]:
    """Ids of every template (train and held-out) that can produce ``prompt``."""
    out = []
    for split, table in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        for i, template in enumerate(table):
            if _template_regex(template).match(prompt + " "):
                out.append(f"{split}/{i}")
    return out


class Grammar:
    """Seeded prompt generator over the tables above."""

    objects = OBJECTS
    scenes = SCENES
    styles = STYLES
    adjectives = ADJECTIVES

    def templates(self, split: str) -> list[str]:
        """Template ids a split may use: train, heldout, or all (both)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        ids = []
        if split in ("all", "train"):
            ids += [f"train/{i}" for i in range(len(TRAIN_TEMPLATES))]
        if split in ("all", "heldout"):
            ids += [f"heldout/{i}" for i in range(len(HELDOUT_TEMPLATES))]
        return ids

    def object_words(self, concept: str, split: str) -> tuple[str, ...]:
        """Surface words of a concept allowed in a split (the train split uses the canonical word only)."""
        words = OBJECTS[concept]
        return words[:1] if split == "train" else words

    def sample(
        self,
        rng: np.random.Generator,
        split: str = "all",
        objects: Optional[Iterable[str]] = None,
        styles: Optional[Iterable[Optional[str]]] = None,
        object_words: Optional[Iterable[str]] = None,
        adjective_prob: float = 0.5,
        scene_prob: float = 0.8,
        style_prob: float = 0.4,
    ) -> WorldRecord:
        """One random record. ``objects``/``styles``/``object_words`` restrict the choice (None in
        ``styles`` means "no style"); otherwise styles appear with ``style_prob``."""
        templates = self.templates(split)
        template = templates[rng.integers(len(templates))]
        if object_words is not None:
            words = [w for w in object_words]
            by_word = {w: c for c, ws in OBJECTS.items() for w in ws}
            unknown = [w for w in words if w not in by_word]
            if unknown:
                raise ValueError(f"object_words: {unknown} are not words of the grammar ({sorted(by_word)})")
            word = words[rng.integers(len(words))]
            concept = by_word[word]
        else:
            concepts = list(objects) if objects is not None else list(OBJECTS)
            unknown = [c for c in concepts if c not in OBJECTS]
            if unknown:
                raise ValueError(f"objects: {unknown} are not objects of the grammar ({', '.join(OBJECTS)})")
            concept = concepts[rng.integers(len(concepts))]
            allowed = self.object_words(concept, split)
            word = allowed[rng.integers(len(allowed))]
        adjective = ADJECTIVES[rng.integers(len(ADJECTIVES))] if rng.random() < adjective_prob else None
        scene_names = list(SCENES)
        scene = scene_names[rng.integers(len(scene_names))] if rng.random() < scene_prob else None
        if styles is not None:
            choices = list(styles)
            unknown = [s for s in choices if s is not None and s not in STYLES]
            if unknown:
                raise ValueError(f"styles: {unknown} are not styles of the grammar ({', '.join(STYLES)})")
            style = choices[rng.integers(len(choices))]
        else:
            style_names = list(STYLES)
            style = style_names[rng.integers(len(style_names))] if rng.random() < style_prob else None
        rec = WorldRecord(prompt="", template=template, object=concept, object_word=word,
                          adjective=adjective, scene=scene, style=style)
        return dataclasses.replace(rec, prompt=realize(rec))
