"""Scale-by-scale decoding with a KV cache: CFG sampling, and the same loop fed given tokens.

Each scale is one forward of all its positions: its queries attend to the cached keys of
earlier scales and to each other (block-causal). With classifier-free guidance the batch
holds the conditional rows, then the unconditional rows (the prompt's T5 states replaced
by the learned ``cfg_uncond``); guidance acts on the bit logits,
``uncond + w (cond - uncond)``, as Infinity's sampler does. Every row draws its bits from
its own seeded generator, so a prompt's image does not depend on its batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ear_dist.models.var.bsq import ScaleCanvas, bit_codes, bits_to_tokens, scale_bounds, token_bits


def _bit_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, n, 2 * bits] -> [B, n, bits, 2]."""
    return logits.float().reshape(*logits.shape[:-1], -1, 2)


def sample_bits(logits: torch.Tensor, temperature: float, greedy: bool,
                generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    """Bits [B, n, bits] from bit logits [B, n, 2 * bits]: the likelier value, or a draw at ``temperature``."""
    pairs = _bit_logits(logits)
    if greedy or temperature == 0:
        return (pairs[..., 1] > pairs[..., 0]).long()
    p_one = torch.softmax(pairs / temperature, dim=-1)[..., 1]
    if generators is None:
        u = torch.rand(p_one.shape, device=p_one.device)
    else:
        u = torch.stack([torch.rand(p_one.shape[1:], generator=g, device=p_one.device) for g in generators])
    return (u < p_one).long()


@torch.no_grad()
def decode_scales(model, features: torch.Tensor, mask: torch.Tensor, choose: Callable[[int, torch.Tensor], torch.Tensor],
                  uncond_features: Optional[torch.Tensor] = None, guidance_weight: float = 1.0,
                  num_scales: Optional[int] = None, on_logits: Optional[Callable] = None) -> torch.Tensor:
    """The KV-cached scale loop: ``choose(k, logits [B, n_k, 2 * bits]) -> bits [B, n_k, bits]`` picks scale k.

    With ``uncond_features`` the unconditional rows run beside the conditional ones and the
    logits ``choose`` sees are guided. ``on_logits(k, logits)`` sees every scale's (guided)
    logits. Returns tokens [B, sum of the decoded scales' sizes].
    """
    cfg = model.config
    batch = features.shape[0]
    guided = uncond_features is not None
    rows = torch.cat([features, uncond_features]) if guided else features
    row_mask = mask.repeat(2, 1) if guided else mask
    text = model.encode_text(rows, row_mask)
    caches = [[] for _ in range(cfg.depth)]
    canvas = ScaleCanvas(batch, cfg.bits, cfg.scales, features.device)
    x = model.start_token(text)
    tokens = []
    bounds = scale_bounds(cfg.scale_sizes)[: num_scales or len(cfg.scales)]
    for k, (start, end) in enumerate(bounds):
        hidden = model.run_blocks(x, text, start, caches=caches)
        logits = model.logits(hidden, text).float()
        if guided:
            cond, uncond = logits.split(batch)
            logits = uncond + guidance_weight * (cond - uncond)
        if on_logits is not None:
            on_logits(k, logits)
        bits = choose(k, logits)
        tokens.append(bits_to_tokens(bits))
        if k + 1 < len(bounds):
            canvas.add(k, bit_codes(bits))
            x = model.word_embed(canvas.next_input(k + 1).to(model.dtype))
            if guided:
                x = x.repeat(2, 1, 1)
    return torch.cat(tokens, dim=1)


def sample(model, features: torch.Tensor, mask: torch.Tensor, uncond_features: Optional[torch.Tensor],
           guidance_weight: float = 5.0, temperature: float = 1.0, greedy: bool = False,
           seeds: Optional[Sequence[int]] = None, progress: bool = False) -> torch.Tensor:
    """Image tokens [B, T] sampled scale by scale with CFG (``guidance_weight`` 1: no unconditional rows)."""
    batch = features.shape[0]
    if seeds is not None and len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
    generators = None
    if seeds is not None and not greedy:
        generators = [torch.Generator(device=features.device).manual_seed(int(s)) for s in seeds]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(model.config.scales), desc="scales", leave=False, unit="scale")

    def choose(k, logits):
        if bar is not None:
            bar.update(1)
        return sample_bits(logits, temperature, greedy, generators)

    guided = guidance_weight != 1.0
    try:
        return decode_scales(model, features, mask, choose, uncond_features if guided else None, guidance_weight)
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def stepwise_logits(model, features: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The scale loop fed ``tokens`` [B, T] instead of sampling: every position's logits [B, T, 2 * bits].

    What teacher forcing must equal; also the per-scale baseline of the benchmarks.
    """
    bits = model.config.bits
    bounds = scale_bounds(model.config.scale_sizes)
    out = []
    decode_scales(model, features, mask, lambda k, logits: token_bits(tokens[:, bounds[k][0]: bounds[k][1]], bits),
                  on_logits=lambda k, logits: out.append(logits))
    return torch.cat(out, dim=1)
