"""An Infinity-style next-scale transformer, written for ear-dist, with the released state-dict layout.

The sequence is every scale's positions, coarse to fine: the start token (the pooled
prompt plus ``pos_start``) is scale 0 (1x1); the inputs of scale k are the running sum
of the codes of scales < k, averaged down to scale k's size and embedded
(``word_embed``). Attention is block-causal over scales: a position sees every position
of its own and earlier scales. Every block is conditioned three ways on the prompt:
adaptive layer norm (one shared projection of the pooled prompt, ``shared_ada_lin``, plus
each block's ``ada_gss``), cross-attention to the projected T5 states, and the start
token. Self-attention is cosine attention (L2-normalised q and k, a learned per-head
scale) with 2-D rotary positions normalised to a reference grid, so a position's angle
depends on where it lies in the image, not on its scale's size. The head is a bitwise
classifier: two logits per bit, ``2 * bits`` per position.

Parameter names are the released checkpoints' (``block_chunks.{c}.module.{j}.sa.mat_qkv``,
``text_proj_for_sos.ca.mat_kv``, ``head_nm.ada_lin.1``, ...), so their weights load by
name. Level embeddings are added at the start of every chunk, as the released code does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ear_dist.models.var.config import VarConfig

LAYER = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
MAX_SCALE_MUL = math.log(100.0)


class FastRMSNorm(nn.Module):
    """RMS norm computed in float32 (the text norm)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` [B, H, L, d] by the angles whose cos/sin are ``rope`` [2, L, d/2]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[0].float(), rope[1].float()
    out = torch.stack([cos * pairs[..., 0] - sin * pairs[..., 1], sin * pairs[..., 0] + cos * pairs[..., 1]], -1)
    return out.reshape(x.shape).to(x.dtype)


def rope_table(cfg: VarConfig) -> torch.Tensor:
    """cos/sin [2, T, head_dim/2] of every position: half the angles from its row, half from its column,
    the row and column scaled to the reference grid (Infinity's 'normalised by h and w' mode 2)."""
    head_dim = cfg.embed_dim // cfg.num_heads
    half = head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    freqs = torch.outer(torch.arange(cfg.rope_table_side).float(), inv_freq)  # [side, half/2]
    ref_h, ref_w = cfg.rope_reference if cfg.rope_reference[0] else cfg.final_scale
    angles = []
    for h, w in cfg.scales:
        rows = (torch.arange(h) * (ref_h / h)).round().long()
        cols = (torch.arange(w) * (ref_w / w)).round().long()
        grid = torch.cat([freqs[rows][:, None, :].expand(h, w, -1), freqs[cols][None, :, :].expand(h, w, -1)], -1)
        angles.append(grid.reshape(h * w, half))
    angles = torch.cat(angles)
    return torch.stack([angles.cos(), angles.sin()])


class SelfAttention(nn.Module):
    """Cosine self-attention; ``past`` (a list, filled on first use) caches keys and values across scales."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                past: Optional[list] = None) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = (self.mat_qkv(x) + bias).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if past is not None:
            if past:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            past[:] = [k, v]
        if k.shape[2] == 1:
            # one key (the first scale, alone): the output is v and q, k get exactly zero gradient, as the
            # softmax of one score is written out here. The fused kernel's backward leaves rounding residue
            # (~1e-8) in their gradients, which Adam divides by its own size into whole-step updates that
            # differ with how the batch is split over ranks.
            scores = (q * k).sum(-1, keepdim=True)
            if attn_mask is not None:
                scores = scores + attn_mask if attn_mask.dtype != torch.bool else \
                    scores.masked_fill(~attn_mask, float("-inf"))
            out = scores.softmax(-1) * v.to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Attention from queries to the prompt's states; ``for_attn_pool``: one learned query per head (the pool)."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.for_attn_pool = for_attn_pool
        if for_attn_pool:
            q = torch.empty(1, num_heads, self.head_dim)
            nn.init.trunc_normal_(q, std=math.sqrt(1 / embed_dim / 3))
            self.mat_q = nn.Parameter(q)
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Optional[torch.Tensor], kv_in: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length = kv_in.shape[:2]
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        k, v = (self.mat_kv(kv_in) + bias).view(b, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.for_attn_pool:
            q = self.mat_q.to(k.dtype).unsqueeze(2).expand(b, -1, -1, -1)
        else:
            q = self.mat_q(x).view(b, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, q.shape[2], -1))


class TextAttentivePool(nn.Module):
    """The prompt's states -> one vector [B, D] (the start token and the adaptive-norm condition)."""

    def __init__(self, text_channels: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.ca = CrossAttention(embed_dim, text_channels, num_heads, for_attn_pool=True)

    def forward(self, kv: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.ca(None, kv, key_mask).squeeze(1)


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SharedAdaLin(nn.Linear):
    """The pooled prompt -> six modulation vectors shared by every block [B, 1, 6, C]."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).reshape(-1, 1, 6, self.weight.shape[0] // 6)


@dataclass
class TextContext:
    """What every block reads from the prompt."""

    cond: torch.Tensor  # [B, D] pooled prompt
    states: torch.Tensor  # [B, L, D] projected T5 states (cross-attention keys and values)
    mask: torch.Tensor  # [B, L] bool, True at prompt tokens
    modulation: torch.Tensor  # [B, 1, 6, C] shared adaptive-norm modulation


class CrossAttnBlock(nn.Module):
    def __init__(self, cfg: VarConfig):
        super().__init__()
        c = cfg.embed_dim
        self.sa = SelfAttention(c, cfg.num_heads)
        self.ca = CrossAttention(c, c, cfg.num_heads)
        self.ffn = FFN(c, cfg.ffn_width)
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=True)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c ** 0.5)

    def forward(self, x: torch.Tensor, text: TextContext, rope: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                past: Optional[list] = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + text.modulation).unbind(2)
        x = x + self.sa(self.ln_wo_grad(x) * (scale1 + 1) + shift1, rope, attn_mask, past) * gamma1
        x = x + self.ca(self.ca_norm(x), text.states, text.mask)
        return x + self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2


class BlockChunk(nn.Module):
    def __init__(self, blocks: list):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.embed_dim).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class VarTransformer(nn.Module):
    """The next-scale transformer; ``config`` is a :class:`VarConfig`."""

    def __init__(self, cfg: VarConfig):
        super().__init__()
        self.config = cfg
        c, text_c = cfg.embed_dim, cfg.text_channels
        init_std = math.sqrt(1 / c / 3)
        # drawn on the CPU with its own seed (the same values wherever the model is built), then placed on the
        # default device: a CPU generator cannot fill a tensor built under a CUDA device context
        uncond = torch.empty(cfg.text_maxlen, text_c, device="cpu")
        nn.init.trunc_normal_(uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.cfg_uncond = nn.Parameter((uncond / text_c ** 0.5).to(torch.get_default_device()))
        self.text_norm = FastRMSNorm(text_c, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_c, c, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_c, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        self.lvl_embed = nn.Embedding(cfg.num_level_embeddings, c)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.word_embed = nn.Linear(cfg.bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c))
        per_chunk = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttnBlock(cfg) for _ in range(per_chunk)]) for _ in range(cfg.block_chunks))
        self.head_nm = AdaLNBeforeHead(c, c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.head_width)
        scale_index = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(cfg.scale_sizes)])
        self.register_buffer("scale_index", scale_index, persistent=False)
        self.register_buffer("rope", rope_table(cfg), persistent=False)

    # ------------------------------------------------------------------ naming (trainable selection)
    def layer_of(self, name: str) -> Optional[tuple[int, str]]:
        """(block index, name inside the block) of a parameter, None outside the blocks."""
        m = LAYER.match(name)
        if not m:
            return None
        per_chunk = self.config.depth // self.config.block_chunks
        return int(m.group(1)) * per_chunk + int(m.group(2)), m.group(3)

    @property
    def num_layers(self) -> int:
        return self.config.depth

    attention_prefixes = ("sa.",)

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embed.weight.dtype

    # ------------------------------------------------------------------ computation
    def encode_text(self, features: torch.Tensor, mask: torch.Tensor) -> TextContext:
        """T5 states [B, L, text_channels] and their mask -> the context every block reads."""
        states = self.text_norm(features.to(self.dtype))
        key_mask = mask.bool()
        cond = self.text_proj_for_sos(states, key_mask)
        return TextContext(cond, self.text_proj_for_ca(states), key_mask, self.shared_ada_lin(cond))

    def start_token(self, text: TextContext) -> torch.Tensor:
        return (text.cond.unsqueeze(1) + self.pos_start).to(self.dtype)

    def run_blocks(self, x: torch.Tensor, text: TextContext, start: int, attn_mask: Optional[torch.Tensor] = None,
                   caches: Optional[list] = None) -> torch.Tensor:
        """Positions ``start .. start + x.shape[1] - 1`` through every block (with level embeddings per chunk)."""
        n = x.shape[1]
        levels = self.lvl_embed(self.scale_index[start: start + n])
        rope = self.rope[:, start: start + n]
        i = 0
        for chunk in self.block_chunks:
            x = x + levels
            for block in chunk.module:
                x = block(x, text, rope, attn_mask, caches[i] if caches is not None else None)
                i += 1
        return x

    def logits(self, hidden: torch.Tensor, text: TextContext) -> torch.Tensor:
        """Bitwise head logits [B, n, 2 * bits] (bit j's two logits at 2j, 2j+1)."""
        return self.head(self.head_nm(hidden, text.cond))

    def forward(self, features: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor, return_logits: bool = True
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher-forced: start token + embedded next-scale inputs [B, n - 1, bits] -> hidden [B, n, C] (and logits)."""
        text = self.encode_text(features, mask)
        x = torch.cat([self.start_token(text), self.word_embed(inputs.to(self.dtype))], dim=1)
        n = x.shape[1]
        scales = self.scale_index[:n]
        block_causal = scales[:, None] >= scales[None, :]
        hidden = self.run_blocks(x, text, 0, block_causal)
        return hidden, self.logits(hidden, text) if return_logits else None
