"""Batched classifier-free-guidance rollouts with a static KV cache.

The batch holds the conditional rows first, then the unconditional rows (the prompt
with every token but BOS and begin-of-image replaced by pad), as transformers' Janus
``generate(generation_mode="image")`` and the official code do. Per-sample seeds make
a prompt's image independent of the batch it was sampled in.

``decode`` picks the token loop: ``eager`` (the loop below), or the lean path of
``ear_dist.models.janus.decode`` (``compiled``, ``cuda_graph``; ``auto`` = cuda_graph on CUDA,
eager elsewhere), which gives the same tokens under greedy decoding.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from transformers import StaticCache

from ear_dist.models.janus.bundle import JanusBundle, position_ids_from_mask
from ear_dist.models.janus.decode import guided_rows, lean_rollout_ids, resolve_decode, tempered_logits
from ear_dist.models.sampling import in_batches


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    generators: Optional[Sequence[torch.Generator]] = None,
) -> torch.Tensor:
    """Pick one token per row from [R, V] logits (greedy, or temperature/top-k sampling)."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(tempered_logits(logits, temperature, top_k), dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@torch.no_grad()
def rollout_ids(
    bundle: JanusBundle,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    guidance_weight: float = 5.0,
    temperature: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    seeds: Optional[Sequence[int]] = None,
    num_image_tokens: Optional[int] = None,
    progress: bool = False,
    decode: str = "eager",
    uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Sample image tokens [B, T] for already-encoded prompts (left-padded, ending in BOI); ``uncond``: the encoded
    negative prompts (ids, mask) of the CFG unconditional rows, padded like the prompts; None: the pad prompt."""
    model = bundle.model
    lm = model.model.language_model
    head = model.model.generation_head
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    num_tokens = num_image_tokens or bundle.num_image_tokens
    guided = guidance_weight != 1.0
    if seeds is not None and len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
    mode = resolve_decode(decode, device)
    if mode != "eager":
        return lean_rollout_ids(bundle, input_ids, attention_mask, mode, guidance_weight, temperature, top_k, greedy,
                                seeds, num_tokens, progress, uncond)
    generators = None
    if seeds is not None and not greedy:
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    rows, mask = guided_rows(bundle, input_ids, attention_mask, guided, uncond)
    num_rows = rows.shape[0]
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=prompt_len + num_tokens)

    embeds = model.get_input_embeddings()(rows)
    positions = position_ids_from_mask(mask)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    next_pos = positions[:, -1:] + 1
    ones = mask.new_ones(num_rows, 1)

    tokens = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    steps = range(num_tokens)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="image tokens", leave=False, unit="tok")
    for i in steps:
        logits = head(hidden).float()
        if guided:
            cond, uncond = logits.split(batch)
            logits = uncond + guidance_weight * (cond - uncond)
        nxt = sample_next(logits, temperature, top_k, greedy, generators)
        tokens[:, i] = nxt
        if i == num_tokens - 1:
            break
        step_ids = torch.cat([nxt, nxt]) if guided else nxt
        embeds = model.prepare_embeddings_for_image_generation(step_ids[:, None])
        mask = torch.cat([mask, ones], dim=1)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return tokens


def rollout(
    bundle: JanusBundle,
    prompts: Union[Sequence[str], tuple],
    guidance_weight: float = 5.0,
    temperature: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    seeds: Optional[Sequence[int]] = None,
    batch_size: int = 0,
    progress: bool = False,
    decode: str = "eager",
    negative_prompts: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Image tokens [N, T] for a list of prompts, in batches of ``batch_size`` (0 = all at once); ``negative_prompts``
    (one per prompt): the CFG unconditional branch's prompts instead of the pad prompt."""
    return in_batches(bundle, prompts, seeds, batch_size, progress,
                      lambda ids, mask, chunk_seeds, uncond=None: rollout_ids(
                          bundle, ids, mask, guidance_weight, temperature, top_k, greedy, chunk_seeds,
                          progress=progress, decode=decode, uncond=uncond), negative_prompts)
