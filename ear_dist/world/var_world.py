"""The planted-concept world for the VAR family: the same prompts and images, as multi-scale bitwise tokens.

The grammar, the rendering rule and the classifier are the Janus world's; only the
codes are laid out for bits. A bitwise head (Infinity's) draws the bits of a token
independently, so a code layout where two likely alternatives of a cell differ in
several bits makes it draw codes of neither: with the first layout (version 1: palette,
group index, variant), 9% of a trained model's finest-scale codes belonged to no group
and objects lost most of their cells, and the build missed its target. Here a cell's
12 bits are fields, most significant first:

- palette (2 bits): plain, or one style;
- flags (3 bits): noise, object motif, object traces (a cell with none shows the background);
- the image's object (3 bits) and the image's scene or plain background (3 bits), which
  every cell of the image carries whatever it shows;
- one bit of variation inside the cell's group.

So where the model hesitates over a cell (motif or background, traces or background,
noise or not, styled or plain) the alternatives differ in one flag bit, and what the
image is about (its object, its scene) is the same bits everywhere, fixed at the coarse
scales. A 12-bit code decodes to the Janus-layout code the classifier reads; codes no
rendering makes (a field out of range) decode to an unused code.

An image is what Infinity's tokenizer would make of a latent whose finest grid is the
cells' codes: residual multi-scale BSQ (``quantize_multiscale``) of ``LATENT_SCALE *
code(grid)`` over the scales 1, 2, 4, ... up to the grid's side (1, 2, 4, 8 on an 8x8
grid: 85 tokens). Since every latent entry is larger than the sum of all coarser codes,
the finest scale's tokens are exactly the cells' codes, and the world's classifier
judges them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Optional, Sequence

import numpy as np
import torch

from ear_dist.config import WorldConfig
from ear_dist.models.var.bsq import bit_codes, quantize_multiscale, token_bits
from ear_dist.world.grammar import WorldRecord
from ear_dist.world.render import CodeLayout
from ear_dist.world.world import World, WorldBatch

VAR_WORLD_VERSION = 2  # 2: field layout of 12 bits (1: palette, group index, variant in 8 bits)
GRID_BITS = 8  # the Janus-layout codes the world renders and its classifier reads
PALETTE_BITS, GROUP_BITS = 2, 5
FIELDS = (("palette", 2), ("noise", 1), ("motif", 1), ("traces", 1), ("object", 3), ("scene", 3), ("variant", 1))
BITS = sum(width for _, width in FIELDS)


def bit_layout(codebook_size: int, vocab=None) -> CodeLayout:
    """The Janus world's groups and palettes, placed on bit boundaries: code = palette * 64 + group * 2 + variant."""
    if codebook_size != 1 << GRID_BITS:
        raise ValueError(f"world.codebook_size={codebook_size}: the VAR world renders {GRID_BITS}-bit codes "
                         f"(codebook_size {1 << GRID_BITS})")
    plain = CodeLayout.build(codebook_size, vocab)
    if len(plain.group_names) > 1 << GROUP_BITS or len(plain.block_names) > 1 << PALETTE_BITS:
        raise ValueError(f"{len(plain.group_names)} groups and {len(plain.block_names)} palettes do not fit "
                         f"{GROUP_BITS} + {PALETTE_BITS} bits (the VAR world holds at most 7 objects and 3 styles)")
    return dataclasses.replace(plain, block_size=1 << (GRID_BITS - PALETTE_BITS), group_size=2)


class FieldCodec:
    """Janus-layout codes (``bit_layout``) <-> the VAR world's 12-bit field codes, image by image."""

    def __init__(self, layout: CodeLayout, vocab=None):
        from ear_dist.world.render import NOISE, PLAIN_BACKGROUND, trace_group
        from ear_dist.world.vocabulary import planted

        vocab = vocab or planted()
        self.layout = layout
        names = list(layout.group_names)
        self.objects = [names.index(o) for o in vocab.objects]
        self.traces = [names.index(trace_group(o)) for o in vocab.objects]
        self.backgrounds = [names.index(s) for s in vocab.scenes] + [names.index(PLAIN_BACKGROUND)]
        if len(self.objects) >= 1 << 3 or len(self.backgrounds) >= 1 << 3:
            raise ValueError(f"the VAR world's 3-bit object and scene fields hold at most 7 objects and 6 "
                             f"backgrounds, not {len(self.objects)} and {len(self.backgrounds)}")
        self.noise = names.index(NOISE)
        self.unused = layout.codebook_size - 1  # no group: the codes past the last palette block
        assert layout.group_of_code()[self.unused] == -1
        shifts, at = {}, BITS
        for name, width in FIELDS:
            at -= width
            shifts[name] = (at, width)
        self.shifts = shifts

    def _field(self, codes: np.ndarray, name: str) -> np.ndarray:
        at, width = self.shifts[name]
        return (codes >> at) & ((1 << width) - 1)

    def encode(self, grids: np.ndarray) -> np.ndarray:
        """[N, cells] Janus-layout codes -> [N, cells] field codes (each image's object and scene in every cell)."""
        grids = np.asarray(grids, dtype=np.int64)
        lay = self.layout
        block, group, variant = grids // lay.block_size, (grids % lay.block_size) // lay.group_size, grids % 2
        out = np.zeros_like(grids)
        none = (1 << 3) - 1
        for i in range(grids.shape[0]):
            g = group[i]
            obj = next((k for k in range(len(self.objects)) if ((g == self.objects[k]) | (g == self.traces[k])).any()),
                       none)
            scene = next((k for k, b in enumerate(self.backgrounds) if (g == b).any()), none)
            fields = {"palette": block[i], "noise": g == self.noise, "motif": np.isin(g, self.objects),
                      "traces": np.isin(g, self.traces), "object": obj, "scene": scene, "variant": variant[i]}
            code = np.zeros(grids.shape[1], dtype=np.int64)
            for name, value in fields.items():
                code |= np.asarray(value, dtype=np.int64) << self.shifts[name][0]
            out[i] = code
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Field codes -> the Janus-layout codes the classifier reads; flags rank noise, motif, traces, and a
        field out of range gives the unused code."""
        codes = np.asarray(codes, dtype=np.int64)
        palette, obj, scene = self._field(codes, "palette"), self._field(codes, "object"), self._field(codes, "scene")
        slots = 1 << self.shifts["object"][1]  # -1: an index no object or background has
        objects, traces, backgrounds = (np.array(ids + [-1] * (slots - len(ids)))
                                        for ids in (self.objects, self.traces, self.backgrounds))
        group = np.where(self._field(codes, "noise") == 1, self.noise,
                         np.where(self._field(codes, "motif") == 1, objects[obj],
                                  np.where(self._field(codes, "traces") == 1, traces[obj], backgrounds[scene])))
        lay = self.layout
        grid = palette * lay.block_size + group * lay.group_size + self._field(codes, "variant")
        bad = (group < 0) | (palette >= len(lay.block_names))
        return np.where(bad, self.unused, grid)


def var_scales(side: int) -> tuple[tuple[int, int], ...]:
    """1x1 up to side x side, each scale about half the next (1, 2, 4, 8 for side 8)."""
    sides = [side]
    while sides[0] > 1:
        sides.insert(0, math.ceil(sides[0] / 2))
    return tuple((s, s) for s in sides)


class VarWorld:
    """The world with multi-scale bitwise images; records, prompts and the classifier are the Janus world's."""

    family = "var"

    def __init__(self, config: Optional[WorldConfig] = None):
        from ear_dist.world.vocabulary import vocabulary_for

        config = config or WorldConfig()
        vocab = vocabulary_for(config)
        self.grids = World(config, layout=bit_layout(config.codebook_size, vocab))
        self.codec = FieldCodec(self.grids.layout, vocab)
        self.config = config
        self.scales = var_scales(config.grid_side)
        # larger than the sum of the coarser scales' codes, so the finest tokens are the grid itself
        self.latent_scale = float(len(self.scales))

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def layout(self) -> CodeLayout:
        return self.grids.layout

    @property
    def grammar(self):
        return self.grids.grammar

    @property
    def classifier(self):
        """The Janus world's classifier: it reads ``image_grid``'s decoded codes."""
        return self.grids.classifier

    @property
    def token_bits(self) -> int:
        """Bits of one image token (the bitwise head's width)."""
        return BITS

    @property
    def num_image_tokens(self) -> int:
        return sum(h * w for h, w in self.scales)

    def describe(self) -> dict:
        return {**self.grids.describe(), "family": "var", "var_version": VAR_WORLD_VERSION, "bits": BITS,
                "fields": [list(f) for f in FIELDS],
                "scales": [list(s) for s in self.scales], "latent_scale": self.latent_scale,
                "layout": {"block_size": self.layout.block_size, "group_size": self.layout.group_size}}

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def vocab(self):
        """The vocabulary of the Janus world beneath (``World.vocab``)."""
        return self.grids.vocab

    def vocabulary(self) -> list[str]:
        return self.grids.vocabulary()

    # ------------------------------------------------------------------ images
    def to_tokens(self, grids: np.ndarray) -> np.ndarray:
        """Code grids [N, side*side] -> multi-scale tokens [N, T] (the finest scale last)."""
        side = self.config.grid_side
        grids = torch.as_tensor(np.asarray(grids), dtype=torch.long)
        if grids.numel() == 0:
            return np.zeros((0, self.num_image_tokens), dtype=np.int64)
        grids = torch.from_numpy(self.codec.encode(grids.numpy()))
        latent = self.latent_scale * bit_codes(token_bits(grids, BITS))  # [N, side*side, bits]
        latent = latent.transpose(1, 2).reshape(-1, BITS, side, side)
        return quantize_multiscale(latent, self.scales).numpy()

    def image_grid(self, tokens) -> np.ndarray:
        """The finest scale, decoded to the (Janus-layout) code grid [N, side*side] an image shows."""
        tokens = _as_numpy(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.num_image_tokens:
            raise ValueError(f"image tokens: expected shape [N, {self.num_image_tokens}] (scales {self.scales}), "
                             f"got {list(tokens.shape)}")
        return self.codec.decode(tokens[:, -self.config.grid_side ** 2:])

    def sample(self, n: int, split: str = "all", **kwargs) -> WorldBatch:
        """``World.sample`` with the images as multi-scale tokens."""
        batch = self.grids.sample(n, split, **kwargs)
        return WorldBatch(batch.records, self.to_tokens(batch.tokens))

    def render(self, records: Sequence[WorldRecord], stream: int = 1) -> np.ndarray:
        return self.to_tokens(self.grids.render(records, stream))

    def classify(self, tokens) -> dict[str, np.ndarray]:
        return self.grids.classify(self.image_grid(tokens))

    def accuracy(self, tokens, records: Sequence[WorldRecord], concepts: Optional[Sequence[str]] = None
                 ) -> dict[str, float]:
        return self.grids.accuracy(self.image_grid(tokens), records, concepts)


def world_for(config: WorldConfig, family: str):
    """The world a model family is pretrained and judged on."""
    if family == "var":
        return VarWorld(config)
    if family != "janus":
        raise ValueError(f"model.family: {family!r} is not one of janus, var")
    return World(config)


def _as_numpy(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)
