"""The shape of an Infinity-style next-scale model: transformer, scale schedule, bits, image decoder.

Plain data (JSON in a saved model's ``var_config.json``). Facts of the released
Infinity-2B that the fields encode: width 2048, 32 blocks in 8 chunks, 16 heads, FFN
4x rounded to 256, T5 text of width 2048 (flan-t5-xl) padded to 512 tokens, a 32-bit
BSQ token per position, 13 scales for a 1024x1024 image (1, 2, 4, 6, 8, 12, 16, 20,
24, 32, 40, 48, 64 on a side), 2-D rotary positions normalised to the 64x64 grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

VAR_MODEL_TYPE = "ear-dist-var"


@dataclass(frozen=True)
class DecoderConfig:
    """The BSQ tokenizer's image decoder (a flux-style conv decoder): latent [bits, h, w] -> RGB."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    upsample_levels: int = 4  # log2 of the patch size: the image side is the latent side times 2**levels


@dataclass(frozen=True)
class VarConfig:
    """Transformer width/depth, text width, bits per token and the scale schedule."""

    embed_dim: int
    depth: int
    num_heads: int
    text_channels: int
    bits: int
    scales: tuple[tuple[int, int], ...]
    mlp_ratio: float = 4.0
    ffn_hidden: int = 0  # 0: round(embed_dim * mlp_ratio / 256) * 256, as the released models
    block_chunks: int = 1
    text_maxlen: int = 512
    pool_head_dim: int = 128  # heads of the text pool = text_channels // pool_head_dim
    rope_reference: tuple[int, int] = (0, 0)  # grid the rotary positions are normalised to; (0, 0) = last scale
    rope_table_side: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    num_level_embeddings: int = 15
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    model_type: str = VAR_MODEL_TYPE

    def __post_init__(self):
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must split into {self.num_heads} heads of a width "
                             "divisible by 4 (2-D rotary positions)")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if not self.scales or tuple(self.scales[0]) != (1, 1):
            raise ValueError(f"scales {self.scales}: the first scale must be (1, 1) (the start token)")
        if len(self.scales) > self.num_level_embeddings:
            raise ValueError(f"{len(self.scales)} scales but only {self.num_level_embeddings} level embeddings")
        if self.pool_heads < 1 or self.embed_dim % self.pool_heads:
            raise ValueError(f"text pool: {self.text_channels} // pool_head_dim {self.pool_head_dim} heads must "
                             f"divide embed_dim {self.embed_dim}")

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.scales)

    @property
    def num_tokens(self) -> int:
        return sum(self.scale_sizes)

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden or round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def pool_heads(self) -> int:
        return self.text_channels // self.pool_head_dim

    @property
    def head_width(self) -> int:
        """Two logits (bit 0, bit 1) per bit."""
        return 2 * self.bits

    @property
    def final_scale(self) -> tuple[int, int]:
        return tuple(self.scales[-1])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "VarConfig":
        """From ``to_dict`` output (JSON lists become tuples); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown VAR config keys {unknown}; expected some of {sorted(names)}")
        values = dict(raw)
        values["scales"] = tuple(tuple(s) for s in values["scales"])
        for key in ("rope_reference",):
            if key in values:
                values[key] = tuple(values[key])
        if "decoder" in values:
            dec = dict(values["decoder"])
            dec["channel_mult"] = tuple(dec.get("channel_mult", DecoderConfig.channel_mult))
            values["decoder"] = DecoderConfig(**dec)
        return cls(**values)
