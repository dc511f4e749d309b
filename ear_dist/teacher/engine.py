"""The frozen teacher M* as an inference engine, behind one interface.

The trainer asks a teacher for two things: image tokens (rollouts) and teacher-forced
targets on the target and surrogate prompts. Where the teacher runs (a copy on every
rank, dedicated ranks, or precomputed shards) is the engine's business, not the
trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ear_dist.models.janus import JanusBundle, teacher_forced, unconditional_ids
from ear_dist.models.rollout import rollout_ids


@dataclass
class TeacherTargets:
    """Teacher outputs for one batch, all [B, T, D] (D = hidden width or codebook size)."""

    on_target: torch.Tensor
    on_surrogate: torch.Tensor
    uncond: Optional[torch.Tensor] = None  # logit mode with teacher-side CFG only


class TeacherEngine:
    """Interface shared by every placement."""

    def rollout(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def targets(
        self, target_prompts: Sequence[str], surrogate_prompts: Sequence[str], tokens: torch.Tensor, mode: str,
        with_uncond: bool = False,
    ) -> TeacherTargets:
        raise NotImplementedError


class ColocatedTeacher(TeacherEngine):
    """An inference-only copy on this rank: no grads, eval mode, static-KV-cache rollouts."""

    def __init__(self, bundle: JanusBundle, cfg_weight: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                 greedy: bool = False):
        self.bundle = bundle
        for p in bundle.model.parameters():
            p.requires_grad_(False)
        bundle.model.eval()
        self.cfg_weight, self.temperature, self.top_k, self.greedy = cfg_weight, temperature, top_k, greedy

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        ids, mask = self.bundle.encode_prompts(list(prompts))
        return rollout_ids(self.bundle, ids, mask, self.cfg_weight, self.temperature, self.top_k, self.greedy, seeds)

    @torch.no_grad()
    def targets(self, target_prompts, surrogate_prompts, tokens, mode, with_uncond=False) -> TeacherTargets:
        # Both prompts of every pair go through one forward (2B rows, or 3B with CFG rows).
        b = len(target_prompts)
        ids, mask = self.bundle.encode_prompts(list(target_prompts) + list(surrogate_prompts))
        rows_tokens = torch.cat([tokens, tokens])
        if with_uncond:
            ids = torch.cat([ids, unconditional_ids(ids[:b], self.bundle.prompt_format)])
            mask = torch.cat([mask, mask[:b]])
            rows_tokens = torch.cat([rows_tokens, tokens])
        hidden, logits = teacher_forced(self.bundle.model, ids, mask, rows_tokens, return_logits=(mode == "logit"))
        out = hidden if mode == "hidden" else logits
        return TeacherTargets(out[:b], out[b : 2 * b], out[2 * b :] if with_uncond else None)
