"""The multi-scale binary spherical quantizer (BSQ) of Infinity's tokenizer, and its image decoder.

A token is ``bits`` binary digits; its code is the unit vector with entries
``+-1/sqrt(bits)`` (bit 1 -> +, bit 0 -> -). An image is a pyramid of token maps, coarse
to fine. The codes of every scale, upsampled (bilinear) to the last scale's size and
summed, form the latent the conv decoder turns into pixels. The next scale's input to
the transformer is that running sum averaged ('area') down to the next scale's size.

Infinity builds the next-scale inputs with 'area' when it samples and with trilinear
when it trains; ear-dist uses 'area' in both, so a teacher-forced forward computes
exactly what the sampler computed for the same tokens.

Tokens are integers, most significant bit first (bit j of a token is ``token >> (bits-1-j) & 1``),
so an image is one integer sequence of every scale's positions, like a Janus raster.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ear_dist.models.var.config import DecoderConfig


def bit_shifts(bits: int, device=None) -> torch.Tensor:
    return torch.arange(bits - 1, -1, -1, device=device)


def token_bits(tokens: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer tokens [...] -> their bits [..., bits] (0/1, long), most significant first."""
    return (tokens.long().unsqueeze(-1) >> bit_shifts(bits, tokens.device)) & 1


def bits_to_tokens(bit_values: torch.Tensor) -> torch.Tensor:
    """Bits [..., bits] (0/1) -> integer tokens [...]."""
    bits = bit_values.shape[-1]
    return (bit_values.long() << bit_shifts(bits, bit_values.device)).sum(-1)


def bit_codes(bit_values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bits [..., bits] -> BSQ codes [..., bits]: +-1/sqrt(bits), unit norm per token."""
    bits = bit_values.shape[-1]
    return (bit_values.to(dtype) * 2 - 1) / math.sqrt(bits)


def check_tokens(tokens: torch.Tensor, bits: int, what: str = "image tokens") -> None:
    """Tokens must be integers in [0, 2**bits); the error names the first bad row and position."""
    bad = (tokens < 0) | (tokens >= (1 << bits))
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what}: row {row}, position {pos} holds {int(tokens[row, pos])}; "
                         f"expected a {bits}-bit token in [0, {1 << bits})")


class ScaleCanvas:
    """The running sum of decoded scales at the last scale's size: what the sampler and teacher forcing share.

    ``add(k, codes)`` adds scale k's codes [B, h_k*w_k, bits]; ``next_input(k)`` is the
    transformer input of scale k [B, h_k*w_k, bits]; ``summed`` [B, bits, H, W] is the
    latent the decoder reads.
    """

    def __init__(self, batch: int, bits: int, scales: Sequence[tuple[int, int]], device, dtype=torch.float32):
        self.scales = [tuple(s) for s in scales]
        self.final = self.scales[-1]
        self.summed = torch.zeros(batch, bits, *self.final, device=device, dtype=dtype)

    def add(self, k: int, codes: torch.Tensor) -> None:
        h, w = self.scales[k]
        grid = codes.transpose(1, 2).reshape(codes.shape[0], codes.shape[2], h, w).to(self.summed.dtype)
        if (h, w) != self.final:
            grid = F.interpolate(grid, size=self.final, mode="bilinear", align_corners=False)
        self.summed = self.summed + grid

    def next_input(self, k: int) -> torch.Tensor:
        size = self.scales[k]
        down = self.summed if size == self.final else F.interpolate(self.summed, size=size, mode="area")
        return down.flatten(2).transpose(1, 2)


def scale_bounds(scale_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of every scale in the flattened token sequence."""
    out, start = [], 0
    for n in scale_sizes:
        out.append((start, start + n))
        start += n
    return out


def teacher_forcing_inputs(tokens: torch.Tensor, scales: Sequence[tuple[int, int]], bits: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The transformer inputs of positions 1..n-1 for the first n tokens [B, n]: [B, n - 1, bits].

    Position 0 is the start token; the inputs of scale k come from the codes of scales < k.
    """
    batch, n = tokens.shape
    sizes = [h * w for h, w in scales]
    canvas = ScaleCanvas(batch, bits, scales, tokens.device, dtype)
    inputs = []
    for k, (start, end) in enumerate(scale_bounds(sizes)):
        if k > 0:
            inputs.append(canvas.next_input(k))
        if end >= n:
            break
        canvas.add(k, bit_codes(token_bits(tokens[:, start:end], bits), dtype))
    if not inputs:
        return tokens.new_zeros(batch, 0, bits, dtype=dtype)
    return torch.cat(inputs, dim=1)[:, : n - 1]


def summed_codes(tokens: torch.Tensor, scales: Sequence[tuple[int, int]], bits: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every scale's codes summed at the last scale's size [B, bits, H, W] (the decoder's input)."""
    canvas = ScaleCanvas(tokens.shape[0], bits, scales, tokens.device, dtype)
    for k, (start, end) in enumerate(scale_bounds([h * w for h, w in scales])):
        canvas.add(k, bit_codes(token_bits(tokens[:, start:end], bits), dtype))
    return canvas.summed


def quantize_multiscale(latent: torch.Tensor, scales: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Residual multi-scale BSQ of a latent [B, bits, H, W] (H, W = the last scale) -> tokens [B, T].

    Per scale: the residual averaged down to the scale, its sign pattern is the token
    (a zero counts as bit 0), and the upsampled code is taken off the residual.
    """
    batch, bits = latent.shape[:2]
    final = tuple(scales[-1])
    if tuple(latent.shape[2:]) != final:
        raise ValueError(f"latent {tuple(latent.shape)}: expected spatial size {final}, the last scale")
    residual = latent.float()
    tokens = []
    for h, w in scales:
        here = residual if (h, w) == final else F.interpolate(residual, size=(h, w), mode="area")
        bit_values = (here > 0).long()  # [B, bits, h, w]
        tokens.append(bits_to_tokens(bit_values.flatten(2).transpose(1, 2)))
        code = (bit_values.float() * 2 - 1) / math.sqrt(bits)
        if (h, w) != final:
            code = F.interpolate(code, size=final, mode="bilinear", align_corners=False)
        residual = residual - code
    return torch.cat(tokens, dim=1)


# --------------------------------------------------------------------------- the image decoder
# Module names follow the released tokenizer's checkpoint ("decoder.conv_in.weight", ...)
# so its weights load by name.


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else 24 if channels % 24 == 0 else 0
    if not groups:
        raise ValueError(f"decoder: {channels} channels is divisible by neither 32 nor 24 (GroupNorm groups)")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class BsqDecoder(nn.Module):
    """Summed codes [B, bits, h, w] -> RGB in [-1, 1] [B, 3, h * 2**levels, w * 2**levels]."""

    def __init__(self, bits: int, cfg: DecoderConfig):
        super().__init__()
        mult = tuple(cfg.channel_mult)
        block_in = cfg.base_channels * mult[-1]
        self.conv_in = nn.Conv2d(bits, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        levels = []
        for level in reversed(range(len(mult))):
            up = nn.Module()
            block_out = cfg.base_channels * mult[level]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up.block = nn.ModuleList(blocks)
            if 1 <= level <= cfg.upsample_levels:
                up.upsample = Upsample(block_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(range(len(self.up))):
            for block in self.up[level].block:
                h = block(h)
            if hasattr(self.up[level], "upsample"):
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h))).clamp(-1, 1)


def normalise_decoder_keys(state: dict, expected: Optional[set] = None) -> dict:
    """Decoder weights from a released tokenizer checkpoint, under this module's names.

    Accepts the checkpoint itself or its ``"vae"`` entry, keeps the ``decoder.`` keys, and
    maps the wrapped names some releases use (``conv_in.conv.weight``, ``norm1.norm.weight``)
    to plain ones.
    """
    if "vae" in state and isinstance(state["vae"], dict):
        state = state["vae"]
    out = {}
    for key, value in state.items():
        if not key.startswith("decoder."):
            continue
        name = key[len("decoder."):]
        if expected is not None and name not in expected:
            for wrapper in (".conv.", ".norm."):
                plain = name.replace(wrapper + "weight", ".weight").replace(wrapper + "bias", ".bias")
                if plain in expected:
                    name = plain
                    break
        out[name] = value
    return out
