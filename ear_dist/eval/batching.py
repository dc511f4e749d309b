"""Evaluation sampling batches: prompts bucketed by length, as many per batch as the KV cache allows.

At the 7B shape one decode step of a CFG rollout reads every weight once whatever the
batch (memory-bound), so images/s grows almost linearly with the batch until the KV
cache, which grows with rows x sequence length, fills the device. The planner takes
``eval.batch_size`` as the most prompts per batch and lowers it, per bucket, to what the
device's KV-cache budget holds: on CUDA a share of the memory free when sampling starts
(optionally capped by ``eval.kv_cache_gib``), on a CPU ``eval.kv_cache_gib`` itself.

Prompts are grouped by token length (buckets of ``BUCKET_TOKENS``) so that a batch
carries little padding, and a bucket is planned for its longest prompt. Every image has
its own seed and padding is masked, so the plan changes speed only, never tokens (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ear_dist.errors import InputError

# of the CUDA memory free before sampling: the rest holds the prompt prefill's activations, logits, decoder buffers
KV_SHARE_OF_FREE = 0.7
CPU_KV_GIB = 2.0  # eval.kv_cache_gib = 0 on a CPU
BUCKET_TOKENS = 16  # prompts whose token lengths round up to the same multiple of this share batches


@dataclass(frozen=True)
class KvBudget:
    """The bytes a sampling batch's KV cache may take on one device, and where the figure comes from."""

    bytes: int
    source: str

    @classmethod
    def of(cls, device: torch.device, kv_cache_gib: float) -> "KvBudget":
        cap = int(kv_cache_gib * 2**30) if kv_cache_gib > 0 else None
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
            budget = int(free * KV_SHARE_OF_FREE)
            source = f"{KV_SHARE_OF_FREE:.0%} of the {free / 2**30:.1f} GiB free on {device}"
            if cap is not None and cap < budget:
                return cls(cap, f"eval.kv_cache_gib={kv_cache_gib:g} (under {source})")
            return cls(budget, source)
        if cap is not None:
            return cls(cap, f"eval.kv_cache_gib={kv_cache_gib:g} on {device}")
        return cls(int(CPU_KV_GIB * 2**30), f"{CPU_KV_GIB:g} GiB on {device} (eval.kv_cache_gib=0)")


@dataclass
class SamplingBatch:
    """Prompts sampled together: their indices into the caller's list and the bucket's length (the longest)."""

    indices: list[int]
    prompt_len: int


@dataclass
class SamplingPlan:
    batches: list[SamplingBatch] = field(default_factory=list)
    budget: Optional[KvBudget] = None
    kv_bytes_per_prompt: dict = field(default_factory=dict)  # bucket length -> bytes of one prompt's KV cache

    def describe(self) -> dict:
        sizes = [len(b.indices) for b in self.batches]
        return {"batches": len(sizes), "largest_batch": max(sizes, default=0),
                "kv_budget_gib": self.budget.bytes / 2**30 if self.budget else None,
                "kv_budget_source": self.budget.source if self.budget else None}


def prompt_lengths(bundle, prompts: Sequence[str]) -> list[int]:
    """Token lengths of prompts as the model's tokenizer counts them (words where it has none); used for grouping."""
    tokenizer = getattr(bundle, "tokenizer", None)
    if tokenizer is None or not prompts:
        return [len(p.split()) for p in prompts]
    return [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]


def kv_bytes_per_prompt(bundle, prompt_len: int, guided: bool) -> Optional[int]:
    """Bytes of one prompt's KV cache over its prompt and every image token (two rows under CFG)."""
    per_token = bundle.kv_bytes_per_token
    if per_token is None:
        return None
    return (2 if guided else 1) * (prompt_len + bundle.num_image_tokens) * per_token


def plan_sampling(bundle, prompts: Sequence[str], batch_size: int, guided: bool,
                  budget: Optional[KvBudget], negatives: Optional[Sequence[str]] = None) -> SamplingPlan:
    """Batches of at most ``batch_size`` prompts of one length bucket, each within ``budget`` (None: no memory bound).

    Batches follow the buckets from short to long prompts; within a bucket, the prompts' order. With ``negatives``
    (one negative prompt per prompt, sampled in its unconditional row) a prompt's length is the longer of the two.
    """
    if batch_size < 1:
        raise InputError(f"eval.batch_size: {batch_size}; it must be at least 1")
    plan = SamplingPlan(budget=budget)
    buckets: dict[int, list[int]] = {}
    lengths = prompt_lengths(bundle, prompts)
    if negatives is not None:
        lengths = [max(a, b) for a, b in zip(lengths, prompt_lengths(bundle, negatives))]
    for i, n in enumerate(lengths):
        buckets.setdefault(-(-max(n, 1) // BUCKET_TOKENS) * BUCKET_TOKENS, []).append(i)
    for length in sorted(buckets):
        size = batch_size
        per_prompt = kv_bytes_per_prompt(bundle, length, guided)
        if per_prompt is not None and budget is not None:
            plan.kv_bytes_per_prompt[length] = per_prompt
            fit = budget.bytes // per_prompt
            if fit < 1:
                raise InputError(f"eval.kv_cache_gib: one prompt of {length} tokens needs {per_prompt / 2**30:.2f} GiB "
                                 f"of KV cache; the budget is {budget.bytes / 2**30:.2f} GiB ({budget.source})")
            size = min(size, int(fit))
        members = buckets[length]
        plan.batches += [SamplingBatch(members[s: s + size], length) for s in range(0, len(members), size)]
    return plan
