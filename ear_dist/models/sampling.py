"""Prompts -> image tokens in batches, for any family's per-batch sampler."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def in_batches(bundle, prompts: Sequence[str], seeds: Optional[Sequence[int]], batch_size: int, progress: bool,
               sample_batch: Callable[..., torch.Tensor],
               negatives: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Encode ``prompts`` batch by batch (0 = all at once) and concatenate ``sample_batch(ids, mask, seeds)``.

    One seed per prompt keeps a prompt's image independent of the batch it lands in. With ``negatives`` (one per
    prompt), each batch's prompts and negative prompts are encoded together (one padded length) and
    ``sample_batch(ids, mask, seeds, uncond=(negative ids, negative mask))`` is called.
    """
    prompts = list(prompts)
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if negatives is not None:
        negatives = list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
    step = batch_size or len(prompts)
    chunks = []
    starts = range(0, len(prompts), step)
    if progress and len(starts) > 1:
        from tqdm import tqdm

        starts = tqdm(starts, desc="rollout batches", unit="batch")
    for s in starts:
        chunk_seeds = seeds[s: s + step] if seeds is not None else None
        if negatives is None:
            ids, mask = bundle.encode_prompts(prompts[s: s + step])
            chunks.append(sample_batch(ids, mask, chunk_seeds))
            continue
        n = len(prompts[s: s + step])
        ids, mask = bundle.encode_prompts(prompts[s: s + step] + negatives[s: s + step])
        chunks.append(sample_batch(ids[:n], mask[:n], chunk_seeds, uncond=(ids[n:], mask[n:])))
    return torch.cat(chunks)
