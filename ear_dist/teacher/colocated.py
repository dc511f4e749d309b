"""Colocated placement: an inference-only copy of the teacher on this rank.

No gradients, eval mode, static-KV-cache CFG rollouts. The dedicated server and the
offline precompute run this same engine on their side, so what a request computes is
defined here once.
"""

from __future__ import annotations

import torch

from ear_dist.models.janus import JanusBundle, teacher_forced, unconditional_ids
from ear_dist.models.rollout import rollout_ids
from ear_dist.teacher.base import Teacher, TeacherOutputs, TeacherRequest, register_placement


class ColocatedTeacher(Teacher):
    """The frozen model on this rank; the student may share its frozen tensors."""

    shares_model = True

    def __init__(self, bundle: JanusBundle):
        self.bundle = bundle
        for p in bundle.model.parameters():
            p.requires_grad_(False)
        bundle.model.eval()

    @torch.no_grad()
    def rollout(self, request: TeacherRequest) -> torch.Tensor:
        """Image tokens [B, T] sampled with CFG from ``request.rollout_prompts``, one seed per row."""
        s = request.settings
        ids, mask = self.bundle.encode_prompts(request.rollout_prompts)
        return rollout_ids(self.bundle, ids, mask, s.sampling_guidance_weight, s.temperature, s.top_k, s.greedy,
                           request.seeds, decode=s.decode)

    @torch.no_grad()
    def forward_targets(self, request: TeacherRequest, tokens: torch.Tensor) -> TeacherOutputs:
        """Teacher-forced outputs on both prompts (and the unconditional one) in one forward."""
        b = len(request)
        ids, mask = self.bundle.encode_prompts(request.target_prompts + request.surrogate_prompts)
        rows_tokens = torch.cat([tokens, tokens])
        if request.settings.with_uncond:
            ids = torch.cat([ids, unconditional_ids(ids[:b], self.bundle.prompt_format)])
            mask = torch.cat([mask, mask[:b]])
            rows_tokens = torch.cat([rows_tokens, tokens])
        logits_wanted = request.settings.mode == "logit"
        hidden, logits = teacher_forced(self.bundle.model, ids, mask, rows_tokens, return_logits=logits_wanted)
        out = logits if logits_wanted else hidden
        return TeacherOutputs(tokens, out[:b], out[b: 2 * b], out[2 * b:] if request.settings.with_uncond else None)

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        tokens = request.tokens.to(self.bundle.device) if request.tokens is not None else self.rollout(request)
        return self.forward_targets(request, tokens)


@register_placement("colocated")
def _build(cfg, runtime, bundle, settings, steps) -> ColocatedTeacher:
    return ColocatedTeacher(bundle)
