"""Dedicated placement: teacher ranks compute rollouts and targets for student ranks.

Both sides walk the same deterministic stream of global batches and build the same
:class:`TeacherRequest` from it, so a teacher rank knows which pairs each of its
students trains on at every step without being told. Per step and student it sends
two tensors (image tokens, stacked outputs) point to point. The teacher runs one step
ahead (it waits for step k-1's sends only after issuing step k's), and each student
posts the receive for step k+1 as soon as step k arrives, so transfer and teacher
compute overlap the student's training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ear_dist.models.family import as_image_model
from ear_dist.teacher.base import Teacher, TeacherOutputs, TeacherRequest, TeacherSettings, register_placement
from ear_dist.teacher.colocated import ColocatedTeacher

TOKENS_TAG, OUTPUTS_TAG = 11, 12


@dataclass(frozen=True)
class Payload:
    """What a teacher sends per step: tokens [b, T] and outputs [k, b, T, width]."""

    rows: int  # pairs per student per step
    num_tokens: int
    width: int
    stacked: int  # 2, or 3 with the unconditional outputs
    dtype: torch.dtype


def payload_for(settings: TeacherSettings, bundle, per_rank_pairs: int) -> Payload:
    """The message shape both sides derive from the same settings and model config."""
    bundle = as_image_model(bundle)
    width = bundle.hidden_size if settings.mode == "hidden" else bundle.head_width
    return Payload(per_rank_pairs, bundle.num_image_tokens, width, 3 if settings.with_uncond else 2, bundle.model.dtype)


class DedicatedTeacher(Teacher):
    """The student-side end: receives what its teacher rank computed for this step."""

    def __init__(self, src: int, payload: Payload, steps: int, device: torch.device):
        self.src, self.payload, self.remaining, self.device = src, payload, steps, device
        self._posted = None

    def _post(self) -> None:
        p = self.payload
        tokens = torch.empty(p.rows, p.num_tokens, dtype=torch.long, device=self.device)
        stacked = torch.empty(p.stacked, p.rows, p.num_tokens, p.width, dtype=p.dtype, device=self.device)
        works = [dist.irecv(tokens, src=self.src, tag=TOKENS_TAG), dist.irecv(stacked, src=self.src, tag=OUTPUTS_TAG)]
        self._posted = (tokens, stacked, works)

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        if self._posted is None:
            self._post()
        tokens, stacked, works = self._posted
        for w in works:
            w.wait()
        self._posted = None
        self.remaining -= 1
        if self.remaining > 0:
            self._post()  # the next step's transfer overlaps this step's training
        if request.tokens is not None and not torch.equal(request.tokens.to(tokens.device), tokens):
            raise RuntimeError(f"dedicated teacher rank {self.src} sent other tokens than the batch's stored ones: "
                               "the ranks walk different pair streams")
        return TeacherOutputs(tokens, stacked[0], stacked[1], stacked[2] if self.payload.stacked == 3 else None)


class DedicatedServer(Teacher):
    """The teacher-rank end: computes every served student's outputs and sends them, one step ahead."""

    def __init__(self, engine: ColocatedTeacher, settings: TeacherSettings, payload: Payload, students: list[int],
                 dp_index: dict[int, int], dp_world: int, steps: int):
        self.engine, self.settings, self.payload = engine, settings, payload
        self.students, self.dp_index, self.dp_world, self.steps = students, dp_index, dp_world, steps

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        return self.engine.outputs(request)

    def serve(self, stream, start: int) -> dict:
        """For every remaining step and served student: build the request, compute, send."""
        t0 = time.perf_counter()
        in_flight: list[list] = []
        for _ in range(self.steps):
            global_batch = stream.next()
            sends = []
            for s in self.students:
                batch = global_batch.local(self.dp_index[s], self.dp_world, self.engine.bundle.device)
                out = self.outputs(TeacherRequest.from_batch(self.settings, batch))
                parts = [out.on_target, out.on_surrogate] + ([out.uncond] if out.uncond is not None else [])
                stacked = torch.stack(parts).to(self.payload.dtype).contiguous()
                tokens = out.tokens.contiguous()
                sends.append([tokens, stacked, dist.isend(tokens, dst=s, tag=TOKENS_TAG),
                              dist.isend(stacked, dst=s, tag=OUTPUTS_TAG)])
            in_flight.append(sends)
            if len(in_flight) > 1:  # one step ahead at most
                _wait(in_flight.pop(0))
        for sends in in_flight:
            _wait(sends)
        return {"role": "teacher", "steps": self.steps, "students": self.students,
                "seconds": time.perf_counter() - t0}


def _wait(sends: list) -> None:
    for entry in sends:
        entry[2].wait()
        entry[3].wait()


@register_placement("dedicated")
def _build(cfg, runtime, bundle, settings, steps) -> Teacher:
    per_rank = cfg.train.pairs_per_step // runtime.dp_world
    payload = payload_for(settings, bundle, per_rank)
    if runtime.role == "teacher":
        served = [runtime.student_ranks[i] for i in runtime.data_slices()]
        dp_index = {s: runtime.student_ranks.index(s) for s in served}
        return DedicatedServer(ColocatedTeacher(bundle), settings, payload, served, dp_index, runtime.dp_world, steps)
    return DedicatedTeacher(runtime.teacher_of(runtime.rank), payload, steps, bundle.device)
