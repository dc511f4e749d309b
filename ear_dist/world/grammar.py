"""The world's language: objects, scenes, adjectives, styles and sentence templates.

The module's tables are the planted world's vocabulary; a world reads its own
(``World.vocab``, ``ear_dist.world.vocabulary``), and every function here takes one
(default: the planted vocabulary).

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
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

if TYPE_CHECKING:
    from ear_dist.world.vocabulary import Vocabulary

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

# style concept -> its name in a prompt ("in the style of <name>"); a style recolours the whole image.
STYLE_NAMES: dict[str, str] = {"van gogh": "Van Gogh", "monet": "Monet"}
STYLES: dict[str, str] = {k: f"in the style of {v}" for k, v in STYLE_NAMES.items()}

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

SPLITS = ("all", "train", "heldout", "validation")  # the order keys each split's random stream


@dataclass(frozen=True)
class WorldRecord:
    """One prompt and the attributes it was built from (what the renderer draws)."""

    prompt: str
    template: str  # "train/<i>", "validation/<i>" or "heldout/<i>"
    object: str  # concept name, an object of the vocabulary
    object_word: str  # the surface word used in the prompt (a synonym for "church" maybe)
    adjective: Optional[str] = None
    scene: Optional[str] = None  # a scene of the vocabulary
    style: Optional[str] = None  # a style of the vocabulary
    style_word: Optional[str] = None  # the style's name in the prompt, lowercased (None: its canonical name)

    def replace(self, vocab: Optional["Vocabulary"] = None, **changes) -> "WorldRecord":
        """The same record with some attributes changed and the prompt realised again (in ``vocab``, default
        the planted vocabulary); a new object gets its canonical word, a new or removed style its canonical name."""
        vocab = vocab or _planted()
        if "object" in changes and "object_word" not in changes:
            changes["object_word"] = vocab.objects[changes["object"]][0]
        if "style" in changes and "style_word" not in changes:
            changes["style_word"] = None
        rec = dataclasses.replace(self, **changes)
        return dataclasses.replace(rec, prompt=realize(rec, vocab))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["style_word"] is None:  # the planted world's records read as they always did
            del out["style_word"]
        return out


def _planted():
    from ear_dist.world.vocabulary import planted

    return planted()


def template_text(template_id: str, vocab: Optional["Vocabulary"] = None) -> str:
    """The template string for an id such as ``train/2``, ``validation/0`` or ``heldout/0``."""
    vocab = vocab or _planted()
    split, _, index = template_id.partition("/")
    table = {"train": vocab.train_templates, "heldout": vocab.heldout_templates,
             "validation": vocab.validation_templates}.get(split)
    if table is None or not index.isdigit() or int(index) >= len(table):
        raise ValueError(f"unknown template id {template_id!r} (expected train/0..{len(vocab.train_templates) - 1}"
                         + (f", validation/0..{len(vocab.validation_templates) - 1}"
                            if vocab.validation_templates else "")
                         + f" or heldout/0..{len(vocab.heldout_templates) - 1})")
    return table[int(index)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(object_word: str, adjective: Optional[str]) -> str:
    head = f"{adjective} {object_word}" if adjective else object_word
    return f"{_article(head)} {head}"


def realize(record: WorldRecord, vocab: Optional["Vocabulary"] = None) -> str:
    """The prompt text of a record: its template filled with its attributes."""
    vocab = vocab or _planted()
    if record.object not in vocab.objects or record.object_word not in vocab.objects[record.object]:
        raise ValueError(f"record object {record.object!r} / word {record.object_word!r} is not in the grammar")
    text = template_text(record.template, vocab).format(
        np=noun_phrase(record.object_word, record.adjective),
        scene=vocab.scenes[record.scene] if record.scene else "",
        style=vocab.style_phrase(record.style, record.style_word) if record.style else "",
    )
    return " ".join(text.split())


def vocabulary(vocab: Optional["Vocabulary"] = None) -> list[str]:
    """Every word any world prompt can contain, lowercased, sorted."""
    return (vocab or _planted()).tokens()


def _template_regex(template: str, vocab: "Vocabulary") -> re.Pattern:
    """A regex matching exactly the prompts this template can produce (for audits)."""
    if template in vocab._regex:
        return vocab._regex[template]
    alt = lambda xs: "|".join(re.escape(x) for x in sorted(xs, key=len, reverse=True))  # noqa: E731
    words = [w for ws in vocab.objects.values() for w in ws]
    styles = [vocab.style_phrase(c, n) for c, ns in vocab.styles.items() for n in ns]
    np_re = rf"(?:a|an)(?: (?:{alt(vocab.adjectives)}))? (?:{alt(words)})"
    # Every piece ends in one space and the prompt is matched with a trailing space, so
    # optional slots (scene, style) vanish together with their separator.
    parts = []
    for token in template.split():
        if token == "{np}":
            parts.append(np_re + " ")
        elif token == "{scene}":
            parts.append(rf"(?:(?:{alt(vocab.scenes.values())}) )?")
        elif token == "{style}":
            parts.append(rf"(?:(?:{alt(styles)}) )?")
        else:
            parts.append(re.escape(token) + " ")
    vocab._regex[template] = re.compile("^" + "".join(parts) + "$")
    return vocab._regex[template]


def matching_templates(prompt: str, vocab: Optional["Vocabulary"] = None) -> list[str]:
    """Ids of every template (train, validation and held-out) that can produce ``prompt``."""
    vocab = vocab or _planted()
    out = []
    for split in ("train", "validation", "heldout"):
        for i, template in enumerate(vocab.template_table(split)):
            if _template_regex(template, vocab).match(prompt + " "):
                out.append(f"{split}/{i}")
    return out


class Grammar:
    """Seeded prompt generator over a vocabulary (default: the planted one)."""

    def __init__(self, vocab: Optional["Vocabulary"] = None):
        self.vocab = vocab or _planted()
        self.objects = self.vocab.objects
        self.scenes = self.vocab.scenes
        self.styles = self.vocab.styles
        self.adjectives = self.vocab.adjectives
        self._by_word = {w: c for c, ws in self.objects.items() for w in ws}

    def templates(self, split: str) -> list[str]:
        """Template ids a split may use: train, validation, heldout, or all (every one)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        ids = []
        for part in ("train", "heldout", "validation"):
            if split in ("all", part):
                ids += [f"{part}/{i}" for i in range(len(self.vocab.template_table(part)))]
        if not ids:
            raise ValueError(f"split {split!r}: this world's vocabulary ({self.vocab.kind}) has no {split} templates")
        return ids

    def object_words(self, concept: str, split: str) -> tuple[str, ...]:
        """Surface words of a concept allowed in a split: the train or validation words, or every word."""
        if split in ("train", "validation"):
            return self.vocab.words(concept, split)
        return self.objects[concept]

    def style_words(self, concept: str, split: str) -> tuple[str, ...]:
        """Names of a style allowed in a split (lowercased), as ``object_words``."""
        if split in ("train", "validation"):
            return self.vocab.words(concept, split)
        return self.vocab.all_words(concept)

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
        style_words: Optional[Iterable[str]] = None,
    ) -> WorldRecord:
        """One random record. ``objects``/``styles``/``object_words``/``style_words`` restrict the choice (None
        in ``styles`` means "no style"); otherwise styles appear with ``style_prob``. A style with more than
        one name allowed in the split draws one (the planted styles have one name: no draw)."""
        templates = self.templates(split)
        template = templates[rng.integers(len(templates))]
        if object_words is not None:
            words = [w for w in object_words]
            unknown = [w for w in words if w not in self._by_word]
            if unknown:
                raise ValueError(f"object_words: {unknown} are not words of the grammar ({sorted(self._by_word)})")
            word = words[rng.integers(len(words))]
            concept = self._by_word[word]
        else:
            concepts = list(objects) if objects is not None else list(self.objects)
            unknown = [c for c in concepts if c not in self.objects]
            if unknown:
                raise ValueError(f"objects: {unknown} are not objects of the grammar ({', '.join(self.objects)})")
            concept = concepts[rng.integers(len(concepts))]
            allowed = self.object_words(concept, split)
            word = allowed[rng.integers(len(allowed))]
        adjective = self.adjectives[rng.integers(len(self.adjectives))] if rng.random() < adjective_prob else None
        scene_names = list(self.scenes)
        scene = scene_names[rng.integers(len(scene_names))] if rng.random() < scene_prob else None
        style_word = None
        if style_words is not None:
            names = [w.lower() for w in style_words]
            by_name = {n: c for c in self.styles for n in self.vocab.all_words(c)}
            unknown = [w for w in names if w not in by_name]
            if unknown:
                raise ValueError(f"style_words: {unknown} are not style names of the grammar ({sorted(by_name)})")
            style_word = names[rng.integers(len(names))]
            style = by_name[style_word]
        elif styles is not None:
            choices = list(styles)
            unknown = [s for s in choices if s is not None and s not in self.styles]
            if unknown:
                raise ValueError(f"styles: {unknown} are not styles of the grammar ({', '.join(self.styles)})")
            style = choices[rng.integers(len(choices))]
        else:
            style_names = list(self.styles)
            style = style_names[rng.integers(len(style_names))] if rng.random() < style_prob else None
        if style is not None and style_words is None:
            allowed_names = self.style_words(style, split)
            if len(allowed_names) > 1:
                style_word = allowed_names[rng.integers(len(allowed_names))]
            elif allowed_names and allowed_names[0] != self.vocab.all_words(style)[0]:
                style_word = allowed_names[0]
        if style_word is not None and style_word == self.vocab.all_words(style)[0]:
            style_word = None  # the canonical name reads as None, as in the planted world
        rec = WorldRecord(prompt="", template=template, object=concept, object_word=word,
                          adjective=adjective, scene=scene, style=style, style_word=style_word)
        return dataclasses.replace(rec, prompt=realize(rec, self.vocab))
