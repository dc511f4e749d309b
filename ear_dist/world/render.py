"""The world's rendering rule: attributes -> a grid of image-token codes.

The codebook is cut into blocks, one per palette: block 0 is the plain palette and
block ``1 + i`` is the palette of style ``i``. Inside every block the codes are cut
into groups of equal size, one group per scene, one for the plain background, one per
object, and one of noise codes. Drawing an image:

1. the scene (or the plain background) fills every cell with its group's codes;
2. the object scatters its trace codes (its surroundings: a church's graveyard, a
   lighthouse's rocks) over a share of the background cells;
3. the object draws its motif in a rectangle at a random position: a fixed pattern of
   its own codes (drawn once from the world seed) with some cells varied at random;
   size adjectives set the rectangle's size, otherwise it is random within bounds;
4. a few cells anywhere become noise codes;
5. a style moves most cells outside the motif (background, traces, noise) into its
   palette block (same group, same offset); the motif keeps its own codes, so an object
   is drawn by the same codes in every style while the rest of the image changes palette.

Every step draws from the ``numpy.random.Generator`` passed in, so a seed fixes the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ear_dist.world.grammar import WorldRecord
from ear_dist.world.vocabulary import Vocabulary, WorldSettingError, planted

PLAIN_BACKGROUND = "plain"
NOISE = "noise"


def trace_group(concept: str) -> str:
    """The name of the code group of an object's traces."""
    return f"{concept} traces"


@dataclass(frozen=True)
class CodeLayout:
    """Which codes belong to which group (scene, object, noise) and palette block (style)."""

    codebook_size: int
    group_names: tuple[str, ...]
    block_names: tuple[Optional[str], ...]  # None = the plain palette, then one per style
    block_size: int
    group_size: int

    @classmethod
    def build(cls, codebook_size: int, vocab: Optional[Vocabulary] = None) -> "CodeLayout":
        """The layout of ``vocab``'s scenes, objects and styles (default: the planted world's)."""
        vocab = vocab or planted()
        objects = tuple(vocab.objects)
        groups = tuple(vocab.scenes) + (PLAIN_BACKGROUND,) + objects + tuple(map(trace_group, objects)) + (NOISE,)
        blocks: tuple[Optional[str], ...] = (None,) + tuple(vocab.styles)
        block_size = codebook_size // len(blocks)
        group_size = block_size // len(groups)
        # two codes per group is the least that still lets images vary inside a group
        if group_size < 2:
            need = 2 * len(groups) * len(blocks)
            raise WorldSettingError(
                f"world.codebook_size={codebook_size} is too small: {len(blocks)} palettes x "
                f"{len(groups)} code groups x 2 codes need at least {need} (the layout: groups = scenes + plain + "
                f"objects + object traces + noise, palettes = 1 + styles)"
            )
        return cls(codebook_size, groups, blocks, block_size, group_size)

    def codes(self, group: str, block: int = 0) -> np.ndarray:
        """The codes of one group inside one palette block."""
        start = block * self.block_size + self.group_names.index(group) * self.group_size
        return np.arange(start, start + self.group_size, dtype=np.int64)

    def group_of_code(self) -> np.ndarray:
        """Per code: the index of its group, or -1 for codes the renderer never uses."""
        out = np.full(self.codebook_size, -1, dtype=np.int64)
        for b in range(len(self.block_names)):
            for g in range(len(self.group_names)):
                start = b * self.block_size + g * self.group_size
                out[start:start + self.group_size] = g
        return out

    def block_of_code(self) -> np.ndarray:
        """Per code: the index of its palette block (0 = plain), or -1 for unused codes."""
        out = np.full(self.codebook_size, -1, dtype=np.int64)
        used = self.group_of_code() >= 0
        out[used] = np.arange(self.codebook_size)[used] // self.block_size
        return out


@dataclass(frozen=True)
class RenderSettings:
    """Knobs of the rendering rule (all part of the world's config hash)."""

    grid_side: int = 8
    codebook_size: int = 256
    motif_keep_prob: float = 0.8  # a motif cell shows its pattern code, else another code of the object
    trace_prob: float = 0.25  # share of background cells showing the object's trace codes
    noise_prob: float = 0.03  # share of cells replaced by noise codes
    style_strength: float = 0.9  # share of the cells outside the motif that a style moves into its palette
    # how far (cells) an object's rectangle may move from the centre; -1 = anywhere on the grid
    centre_jitter: int = -1

    def motif_size_bounds(self) -> tuple[int, int]:
        """Smallest and largest side of an object's rectangle (3..4 on an 8x8 grid)."""
        lo = max(2, round(self.grid_side * 0.375))
        hi = max(lo, round(self.grid_side * 0.5))
        return lo, hi


class Renderer:
    """Draws records as token grids; object motif patterns are fixed by ``pattern_seed``."""

    def __init__(self, settings: RenderSettings, pattern_seed: int, layout: Optional[CodeLayout] = None,
                 vocab: Optional[Vocabulary] = None):
        if settings.grid_side < 4:
            raise ValueError(f"world.grid_side={settings.grid_side}: must be >= 4 (an object needs room to move)")
        self.settings = settings
        self.vocab = vocab or planted()
        self.layout = layout if layout is not None else CodeLayout.build(settings.codebook_size, self.vocab)
        self._style_block = {name: 1 + i for i, name in enumerate(self.vocab.styles)}
        lo, hi = settings.motif_size_bounds()
        self.motif_lo, self.motif_hi = lo, hi
        rng = np.random.default_rng(np.random.SeedSequence([pattern_seed, 0x6D6F74]))
        # each object's motif: a fixed hi x hi pattern of offsets into its code group
        self.patterns = {
            name: rng.integers(0, self.layout.group_size, size=(hi, hi)) for name in self.vocab.objects
        }

    @property
    def num_tokens(self) -> int:
        return self.settings.grid_side ** 2

    def motif_shape(self, adjective: Optional[str], rng: np.random.Generator) -> tuple[int, int]:
        lo, hi = self.motif_lo, self.motif_hi
        if adjective == "small":
            return lo, lo
        if adjective == "big":
            return hi, hi
        if adjective == "tall":
            return hi, lo
        return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))

    def motif_corner(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left cell of an h x w rectangle: anywhere, or within ``centre_jitter`` of the centre."""
        side, jitter = self.settings.grid_side, self.settings.centre_jitter
        corner = []
        for size in (h, w):
            if jitter < 0:
                corner.append(int(rng.integers(0, side - size + 1)))
            else:
                centre = (side - size) // 2
                corner.append(int(np.clip(centre + rng.integers(-jitter, jitter + 1), 0, side - size)))
        return corner[0], corner[1]

    def render(self, record: WorldRecord, rng: np.random.Generator) -> np.ndarray:
        """One image: int64 codes of shape [grid_side * grid_side], row-major."""
        s, lay = self.settings, self.layout
        side = s.grid_side
        background = lay.codes(record.scene or PLAIN_BACKGROUND)
        grid = background[rng.integers(0, len(background), size=(side, side))]

        traces = lay.codes(trace_group(record.object))
        traced = rng.random((side, side)) < s.trace_prob
        grid[traced] = traces[rng.integers(0, len(traces), size=int(traced.sum()))]

        h, w = self.motif_shape(record.adjective, rng)
        top, left = self.motif_corner(h, w, rng)
        motif = lay.codes(record.object)
        offsets = self.patterns[record.object][:h, :w].copy()
        varied = rng.random((h, w)) >= s.motif_keep_prob
        offsets[varied] = rng.integers(0, lay.group_size, size=int(varied.sum()))
        grid[top:top + h, left:left + w] = motif[offsets]
        in_motif = np.zeros((side, side), dtype=bool)
        in_motif[top:top + h, left:left + w] = True

        noise = lay.codes(NOISE)
        noisy = rng.random((side, side)) < s.noise_prob
        grid[noisy] = noise[rng.integers(0, len(noise), size=int(noisy.sum()))]

        if record.style:
            block = self._style_block[record.style]
            styled = (rng.random((side, side)) < s.style_strength) & ~in_motif
            grid[styled] += block * lay.block_size
        return grid.reshape(-1)
