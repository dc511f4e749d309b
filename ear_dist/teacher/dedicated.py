"""Dedicated placement: teacher ranks compute rollouts and targets for student ranks.

Both sides walk the same deterministic stream of global batches, so a teacher rank
knows which pairs each of its students trains on at every step without being told.
Per step and student it sends two tensors (image tokens, stacked targets) point to
point. The teacher runs one step ahead (it waits for step k-1's sends only after
issuing step k's), and each student posts the receive for step k+1 as soon as step k
arrives, so transfer and teacher compute overlap the student's training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ear_dist.config import Config
from ear_dist.teacher.engine import ColocatedTeacher, TeacherEngine, TeacherTargets

TOKENS_TAG, TARGETS_TAG = 11, 12


@dataclass(frozen=True)
class Payload:
    """What a teacher sends per step: tokens [b, T] and targets [k, b, T, width]."""

    mode: str  # hidden | logit
    with_uncond: bool
    rows: int  # pairs per student per step
    num_tokens: int
    width: int
    dtype: torch.dtype

    @property
    def stacked(self) -> int:
        return 3 if self.with_uncond else 2


def payload_for(cfg: Config, model, per_rank_pairs: int) -> Payload:
    """The message shape both sides derive from the same config and model config."""
    mode = "logit" if cfg.erase.method == "svare" else cfg.erase.target_mode
    with_uncond = cfg.erase.method != "svare" and mode == "logit" and cfg.erase.teacher_cfg_weight > 0
    mc = model.config
    width = mc.text_config.hidden_size if mode == "hidden" else mc.vq_config.num_embeddings
    return Payload(mode, with_uncond, per_rank_pairs, int(mc.vision_config.num_image_tokens), width, model.dtype)


class DedicatedTeacher(TeacherEngine):
    """The student-side end: receives what its teacher rank computed for this step."""

    def __init__(self, src: int, payload: Payload, steps: int, device: torch.device):
        self.src, self.payload, self.remaining, self.device = src, payload, steps, device
        self._posted = None
        self._current = None

    def _post(self) -> None:
        p = self.payload
        tokens = torch.empty(p.rows, p.num_tokens, dtype=torch.long, device=self.device)
        targets = torch.empty(p.stacked, p.rows, p.num_tokens, p.width, dtype=p.dtype, device=self.device)
        works = [dist.irecv(tokens, src=self.src, tag=TOKENS_TAG), dist.irecv(targets, src=self.src, tag=TARGETS_TAG)]
        self._posted = (tokens, targets, works)

    def _fetch(self):
        if self._current is None:
            if self._posted is None:
                self._post()
            tokens, targets, works = self._posted
            for w in works:
                w.wait()
            self._posted = None
            self._current = (tokens, targets)
            self.remaining -= 1
            if self.remaining > 0:
                self._post()  # the next step's transfer overlaps this step's training
        return self._current

    def rollout(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return self._fetch()[0]

    def targets(self, target_prompts, surrogate_prompts, tokens, mode, with_uncond=False) -> TeacherTargets:
        _, stacked = self._fetch()
        self._current = None
        if mode != self.payload.mode or with_uncond != self.payload.with_uncond:
            raise RuntimeError(f"student asked for {mode} targets (uncond={with_uncond}), teacher serves "
                               f"{self.payload.mode} (uncond={self.payload.with_uncond})")
        return TeacherTargets(stacked[0], stacked[1], stacked[2] if with_uncond else None)


def serve(teacher: ColocatedTeacher, payload: Payload, students: Sequence[int],
          local_batches: Callable[[int, int], "object"], steps: int) -> int:
    """Teacher-rank loop: for every step and served student, compute and send. Returns steps served.

    ``local_batches(step, student_rank)`` gives the PairBatch that student trains on at ``step``.
    """
    in_flight: list[list] = []
    for step in range(steps):
        sends = []
        for s in students:
            batch = local_batches(step, s)
            prompts = batch.surrogate_prompts
            tokens = batch.tokens if batch.tokens is not None else teacher.rollout(prompts, batch.seeds)
            t = teacher.targets(batch.target_prompts, batch.surrogate_prompts, tokens, payload.mode,
                                payload.with_uncond)
            parts = [t.on_target, t.on_surrogate] + ([t.uncond] if payload.with_uncond else [])
            stacked = torch.stack(parts).to(payload.dtype).contiguous()
            tokens = tokens.contiguous()
            sends.append([tokens, stacked, dist.isend(tokens, dst=s, tag=TOKENS_TAG),
                          dist.isend(stacked, dst=s, tag=TARGETS_TAG)])
        in_flight.append(sends)
        if len(in_flight) > 1:  # one step ahead at most
            for entry in in_flight.pop(0):
                entry[2].wait()
                entry[3].wait()
    for sends in in_flight:
        for entry in sends:
            entry[2].wait()
            entry[3].wait()
    return steps
