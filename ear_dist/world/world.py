"""``World``: grammar + renderer + calibrated classifier, fixed by one seed and config.

    world = World(WorldConfig(seed=0))
    batch = world.sample(64, split="train")           # prompts and their token grids
    world.accuracy(batch.tokens, batch.records)       # per-concept balanced accuracy

Everything is a function of (seed, config, code): the same seed gives byte-identical
prompts and grids, and ``config_hash`` names that combination (it keys the cache of
models pretrained on this world).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ear_dist.config import WorldConfig
from ear_dist.world.classifier import ConceptClassifier
from ear_dist.world.grammar import SPLITS, Grammar, WorldRecord
from ear_dist.world.render import CodeLayout, Renderer, RenderSettings
from ear_dist.world.vocabulary import Vocabulary, vocabulary_for

# Bump when the grammar or rendering rule changes meaning, so cached models are rebuilt.
WORLD_VERSION = 2  # 2: a style leaves the object motif in its own codes

# Distinct random streams per purpose, so sampling one never shifts another.
_CALIBRATION_STREAM = 0xCA1
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}


@dataclass
class WorldBatch:
    """Records (prompt + attributes) and their rendered image tokens [N, side*side] (int64)."""

    records: list[WorldRecord]
    tokens: np.ndarray

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


class World:
    """The deterministic synthetic world: prompts, images, and a classifier of its concepts."""

    family = "janus"  # the model family whose images it holds (VarWorld: "var")

    def __init__(self, config: Optional[WorldConfig] = None, layout: Optional[CodeLayout] = None):
        self.config = config or WorldConfig()
        self.settings = RenderSettings(grid_side=self.config.grid_side, codebook_size=self.config.codebook_size)
        self.vocab: Vocabulary = vocabulary_for(self.config)
        self.grammar = Grammar(self.vocab)
        self.renderer = Renderer(self.settings, pattern_seed=self.config.seed, layout=layout, vocab=self.vocab)
        self.layout = self.renderer.layout
        self.classifier = ConceptClassifier(self.layout, self.config.grid_side, window=self.renderer.motif_lo,
                                            vocab=self.vocab)
        calibration = self.sample(self.config.calibration_samples, split="all", stream=_CALIBRATION_STREAM)
        self.classifier.calibrate(calibration.tokens, calibration.records)

    # ------------------------------------------------------------------ identity

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def num_image_tokens(self) -> int:
        return self.config.grid_side ** 2

    def describe(self) -> dict:
        """Everything that determines the world's data, as plain JSON-able data."""
        return {
            "version": WORLD_VERSION,
            "seed": self.config.seed,
            "calibration_samples": self.config.calibration_samples,
            "render": asdict(self.settings),
            **self.vocab.describe(),
        }

    @property
    def config_hash(self) -> str:
        """A short hash of ``describe()``: same hash, same world."""
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def vocabulary(self) -> list[str]:
        """Every word a prompt of this world can contain, lowercased (for the tiny model's tokenizer)."""
        return self.vocab.tokens()

    # ------------------------------------------------------------------ data

    def rng(self, split: str, stream: int) -> np.random.Generator:
        """The generator for one (split, stream); streams let callers draw independent data."""
        if split not in _SPLIT_CODE:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        return np.random.default_rng(np.random.SeedSequence([self.config.seed, _SPLIT_CODE[split], int(stream)]))

    def sample(
        self,
        n: int,
        split: str = "all",
        *,
        stream: int = 1,
        objects: Optional[Iterable[str]] = None,
        styles: Optional[Iterable[Optional[str]]] = None,
        object_words: Optional[Iterable[str]] = None,
        style_words: Optional[Iterable[str]] = None,
    ) -> WorldBatch:
        """``n`` records of a split with their images.

        split: ``all`` (every template and word: the pretraining distribution), ``train``
        (training templates, the concepts' train words only: what erasure pairs may use),
        ``validation`` (validation templates and words: for choosing settings; generated
        vocabularies only) or ``heldout`` (held-out templates, every word). ``stream``
        selects an independent random stream; ``objects``, ``styles`` (None = no style),
        ``object_words`` and ``style_words`` restrict what is drawn.
        """
        if n < 0:
            raise ValueError(f"sample: n must be >= 0, got {n}")
        rng = self.rng(split, stream)
        objects = list(objects) if objects is not None else None
        styles = list(styles) if styles is not None else None
        object_words = list(object_words) if object_words is not None else None
        style_words = list(style_words) if style_words is not None else None
        records, grids = [], []
        for _ in range(n):
            rec = self.grammar.sample(rng, split, objects=objects, styles=styles, object_words=object_words,
                                      style_words=style_words)
            records.append(rec)
            grids.append(self.renderer.render(rec, rng))
        tokens = np.stack(grids) if grids else np.zeros((0, self.num_image_tokens), dtype=np.int64)
        return WorldBatch(records, tokens)

    def render(self, records: Sequence[WorldRecord], stream: int = 1) -> np.ndarray:
        """Images for given records (for example the surrogates of pairs): [N, side*side] int64."""
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0x52454E, int(stream)]))
        if not records:
            return np.zeros((0, self.num_image_tokens), dtype=np.int64)
        return np.stack([self.renderer.render(r, rng) for r in records])

    # ------------------------------------------------------------------ judging images

    def image_grid(self, tokens) -> np.ndarray:
        """The code grid [N, side*side] an image's tokens show (for this world, the tokens themselves)."""
        return _as_numpy(tokens)

    def classify(self, tokens) -> dict[str, np.ndarray]:
        """Per concept, a bool per image (tokens [N, side*side], numpy or torch)."""
        return self.classifier.predict(_as_numpy(tokens))

    def accuracy(self, tokens, records: Sequence[WorldRecord], concepts: Optional[Sequence[str]] = None) -> dict[str, float]:
        """Balanced accuracy per concept (and per synonym) of the classifier on these images."""
        return self.classifier.accuracy(_as_numpy(tokens), records, concepts)


def _as_numpy(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)
