"""Colocated placement: an inference-only copy of the teacher on this rank.

No gradients, eval mode, static-KV-cache CFG rollouts. The dedicated server and the
offline precompute run this same engine on their side, so what a request computes is
defined here once.
"""

from __future__ import annotations

import torch

from ear_dist.models.family import as_image_model
from ear_dist.models.interface import ImageModel
from ear_dist.teacher.base import Teacher, TeacherOutputs, TeacherRequest, register_placement


class ColocatedTeacher(Teacher):
    """The frozen model on this rank; the student may share its frozen tensors."""

    shares_model = True

    def __init__(self, bundle: ImageModel):
        self.bundle = bundle = as_image_model(bundle)
        for p in bundle.model.parameters():
            p.requires_grad_(False)
        bundle.model.eval()

    @torch.no_grad()
    def rollout(self, request: TeacherRequest) -> torch.Tensor:
        """Image tokens [B, T] sampled with CFG from ``request.rollout_prompts``, one seed per row."""
        s = request.settings
        ids, mask = self.bundle.encode_prompts(request.rollout_prompts)
        return self.bundle.rollout_ids(ids, mask, s.sampling_guidance_weight, s.temperature, s.top_k, s.greedy,
                                       request.seeds, decode=s.decode)

    @torch.no_grad()
    def forward_targets(self, request: TeacherRequest, tokens: torch.Tensor) -> TeacherOutputs:
        """Teacher-forced outputs on the target prompt, the reference (surrogate or unconditional)
        and, with teacher-side guidance, the unconditional prompt, in one forward."""
        s, b = request.settings, len(request)
        from_uncond = s.reference == "unconditional"
        ids, mask = self.bundle.encode_prompts(request.target_prompts if from_uncond
                                               else request.target_prompts + request.surrogate_prompts)
        if from_uncond or s.with_uncond:
            ids = torch.cat([ids, self.bundle.unconditional(ids[:b])])
            mask = torch.cat([mask, mask[:b]])
        rows_tokens = tokens.repeat(ids.shape[0] // b, 1)
        logits_wanted = s.mode == "logit"
        hidden, logits = self.bundle.teacher_forced(self.bundle.model, ids, mask, rows_tokens,
                                                    return_logits=logits_wanted)
        out = logits if logits_wanted else hidden
        uncond = out[-b:] if s.with_uncond else None
        return TeacherOutputs(tokens, out[:b], out[b: 2 * b], uncond)

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        tokens = request.tokens.to(self.bundle.device) if request.tokens is not None else self.rollout(request)
        return self.forward_targets(request, tokens)


@register_placement("colocated")
def _build(cfg, runtime, bundle, settings, steps) -> ColocatedTeacher:
    return ColocatedTeacher(bundle)
