"""Prompts -> image tokens in batches, for any family's per-batch sampler."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def in_batches(bundle, prompts: Sequence[str], seeds: Optional[Sequence[int]], batch_size: int, progress: bool,
               sample_batch: Callable[[torch.Tensor, torch.Tensor, Optional[list]], torch.Tensor]) -> torch.Tensor:
    """Encode ``prompts`` batch by batch (0 = all at once) and concatenate ``sample_batch(ids, mask, seeds)``.

    One seed per prompt keeps a prompt's image independent of the batch it lands in.
    """
    prompts = list(prompts)
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    step = batch_size or len(prompts)
    chunks = []
    starts = range(0, len(prompts), step)
    if progress and len(starts) > 1:
        from tqdm import tqdm

        starts = tqdm(starts, desc="rollout batches", unit="batch")
    for s in starts:
        ids, mask = bundle.encode_prompts(prompts[s: s + step])
        chunks.append(sample_batch(ids, mask, seeds[s: s + step] if seeds is not None else None))
    return torch.cat(chunks)
