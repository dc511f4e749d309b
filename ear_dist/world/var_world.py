"""The planted-concept world for the VAR family: the same prompts and code grids, as multi-scale bitwise tokens.

The grammar, the rendering rule and the classifier are the Janus world's; only the
codes are laid out for bits. A code is 8 bits, most significant first: the palette (2
bits: plain or a style), the group (5 bits: a scene, the plain background, an object,
an object's traces, noise) and one bit of variation inside the group. So a style, an
object or a scene is a fixed pattern of a few bits, which a bitwise head can learn bit
by bit.

An image is what Infinity's tokenizer would make of a latent whose finest grid is the
rendered code grid: residual multi-scale BSQ (``quantize_multiscale``) of
``LATENT_SCALE * code(grid)`` over the scales 1, 2, 4, ... up to the grid's side (1, 2,
4, 8 on an 8x8 grid: 85 tokens). The coarse scales carry the palette and where things
are; since every latent entry is larger than the sum of all coarser codes, the finest
scale's tokens are exactly the rendered grid, and the world's classifier judges them.
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

VAR_WORLD_VERSION = 1
BITS = 8
PALETTE_BITS, GROUP_BITS = 2, 5


def bit_layout(codebook_size: int) -> CodeLayout:
    """The Janus world's groups and palettes, placed on bit boundaries: code = palette * 64 + group * 2 + variant."""
    if codebook_size != 1 << BITS:
        raise ValueError(f"world.codebook_size={codebook_size}: the VAR world's tokens are {BITS} bits "
                         f"(codebook_size {1 << BITS})")
    plain = CodeLayout.build(codebook_size)
    if len(plain.group_names) > 1 << GROUP_BITS or len(plain.block_names) > 1 << PALETTE_BITS:
        raise ValueError(f"{len(plain.group_names)} groups and {len(plain.block_names)} palettes do not fit "
                         f"{GROUP_BITS} + {PALETTE_BITS} bits")
    return dataclasses.replace(plain, block_size=1 << (BITS - PALETTE_BITS), group_size=2)


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
        config = config or WorldConfig()
        self.grids = World(config, layout=bit_layout(config.codebook_size))
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
    def num_image_tokens(self) -> int:
        return sum(h * w for h, w in self.scales)

    def describe(self) -> dict:
        return {**self.grids.describe(), "family": "var", "var_version": VAR_WORLD_VERSION, "bits": BITS,
                "scales": [list(s) for s in self.scales], "latent_scale": self.latent_scale,
                "layout": {"block_size": self.layout.block_size, "group_size": self.layout.group_size}}

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def vocabulary() -> list[str]:
        return World.vocabulary()

    # ------------------------------------------------------------------ images
    def to_tokens(self, grids: np.ndarray) -> np.ndarray:
        """Code grids [N, side*side] -> multi-scale tokens [N, T] (the finest scale last)."""
        side = self.config.grid_side
        grids = torch.as_tensor(np.asarray(grids), dtype=torch.long)
        if grids.numel() == 0:
            return np.zeros((0, self.num_image_tokens), dtype=np.int64)
        latent = self.latent_scale * bit_codes(token_bits(grids, BITS))  # [N, side*side, bits]
        latent = latent.transpose(1, 2).reshape(-1, BITS, side, side)
        return quantize_multiscale(latent, self.scales).numpy()

    def image_grid(self, tokens) -> np.ndarray:
        """The finest scale [N, side*side]: the code grid an image shows."""
        tokens = _as_numpy(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.num_image_tokens:
            raise ValueError(f"image tokens: expected shape [N, {self.num_image_tokens}] (scales {self.scales}), "
                             f"got {list(tokens.shape)}")
        return tokens[:, -self.config.grid_side ** 2:]

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
