"""Instruments that observe the real erasure step from outside, for ``ear-dist bench``.

* the teacher is wrapped, so rollouts and targets are timed as ``teacher_rollout`` /
  ``teacher_targets``;
* forward hooks on the student's language model and image head time
  ``student_fwd_bwd`` (forward) and record each forward's rows and length, for the FLOPs;
* the updater is wrapped: ``backward`` adds to ``student_fwd_bwd``, ``step``/``zero_grad``
  are ``optimizer``;
* ``loss`` is the time from the end of a student forward to the next thing the student
  does (backward, another forward, the optimizer, or the step's end): the per-token
  loss, the window sums and the threshold mask.

FLOPs per phase use :mod:`ear_dist.telemetry.flops`: rollouts ``2N`` per generated
token on every row (CFG doubles the rows) plus the prompt prefill, teacher targets
``2N + 4Lhs`` per token of every row, and the student ``6N + 12Lhs`` per token of every
forward that a backward followed (``2N + 4Lhs`` for forwards whose windows were all
masked). Because erasure trains a few layers, the student's MFU is also given from the
FLOPs the partial backward really does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ear_dist.models.janus import JanusBundle
from ear_dist.teacher.base import Teacher, TeacherOutputs, TeacherRequest
from ear_dist.teacher.colocated import ColocatedTeacher
from ear_dist.telemetry.flops import (
    JanusFlopsShape,
    executed_train_flops_per_token,
    frozen_forward_flops_per_token,
    rollout_flops,
    train_flops_per_token,
)
from ear_dist.telemetry.timer import (
    LOSS,
    OPTIMIZER,
    STUDENT_FWD_BWD,
    TEACHER_ROLLOUT,
    TEACHER_TARGETS,
    PhaseTimers,
)


class PhaseSwitch:
    """Holds at most one open phase opened from a hook, and closes it on the next switch."""

    def __init__(self, timers: PhaseTimers):
        self.timers = timers
        self._open = None

    def switch(self, phase: Optional[str]) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        if phase is not None:
            self._open = self.timers.phase(phase)
            self._open.__enter__()


@dataclass
class StepCounts:
    """Tokens and FLOPs per phase in one step, filled by the instrumentation."""

    flops: dict = field(default_factory=dict)
    executed_flops: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)

    def scaled(self, factor: float) -> "StepCounts":
        return StepCounts(
            {k: v * factor for k, v in self.flops.items()},
            {k: v * factor for k, v in self.executed_flops.items()},
            {k: v * factor for k, v in self.tokens.items()},
        )

    def merge(self, other: "StepCounts") -> None:
        for phase, flops in other.flops.items():
            self.add(phase, flops, other.tokens.get(phase, 0), other.executed_flops[phase])

    def add(self, phase: str, flops: float, tokens: float = 0, executed: Optional[float] = None) -> None:
        self.flops[phase] = self.flops.get(phase, 0) + flops
        self.executed_flops[phase] = self.executed_flops.get(phase, 0) + (flops if executed is None else executed)
        if tokens:
            self.tokens[phase] = self.tokens.get(phase, 0) + tokens


class TimedTeacher(Teacher):
    """A teacher whose work is timed and counted: rollouts as ``teacher_rollout``, the
    teacher-forced outputs as ``teacher_targets`` (a placement that answers in one piece,
    such as offline shards, is timed as ``teacher_targets`` as a whole)."""

    def __init__(self, inner: Teacher, bundle: JanusBundle, timers: PhaseTimers, shape: JanusFlopsShape):
        self.inner, self.bundle, self.timers, self.shape = inner, bundle, timers, shape
        self.shares_model = inner.shares_model
        self.counts = StepCounts()

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        if not isinstance(self.inner, ColocatedTeacher):
            with self.timers.phase(TEACHER_TARGETS):
                return self.inner.outputs(request)
        tokens = request.tokens
        if tokens is None:
            with self.timers.phase(TEACHER_ROLLOUT):
                tokens = self.inner.rollout(request)
            prompt_len = self.bundle.encode_prompts(request.rollout_prompts)[0].shape[1]
            b, t = tokens.shape
            guided = request.settings.sampling_guidance_weight != 1.0
            self.counts.add(TEACHER_ROLLOUT, rollout_flops(self.shape, prompt_len, t, batch_size=b, guided=guided),
                            tokens=b * t)
        tokens = tokens.to(self.bundle.device)
        with self.timers.phase(TEACHER_TARGETS):
            out = self.inner.forward_targets(request, tokens)
        prompt_len = self.bundle.encode_prompts(request.target_prompts + request.surrogate_prompts)[0].shape[1]
        b, t = tokens.shape
        rows = (3 if request.settings.with_uncond else 2) * b
        seq_len = prompt_len + t - 1  # teacher_forced: the prompt, then image tokens 0..T-2
        self.counts.add(TEACHER_TARGETS, rows * seq_len * frozen_forward_flops_per_token(self.shape, seq_len),
                        tokens=b * t)
        return out


class StudentInstruments:
    """Forward hooks and an updater wrapper that time and count the student's work."""

    def __init__(self, student: torch.nn.Module, timers: PhaseTimers, shape: JanusFlopsShape,
                 trainable_params: int, lowest_trainable_layer: int):
        self.switch = PhaseSwitch(timers)
        self.shape = shape
        self.trainable_params = trainable_params
        self.lowest_trainable_layer = lowest_trainable_layer
        self.counts = StepCounts()
        # (rows, tokens, attention length) of forwards not yet backpropagated
        self._pending: list[tuple[int, int, int]] = []
        lm = student.model.language_model
        head = student.model.generation_head
        self._handles = [
            lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            lm.register_forward_hook(self._after_forward),
            head.register_forward_pre_hook(lambda m, a: self.switch.switch(STUDENT_FWD_BWD)),
            head.register_forward_hook(self._after_forward),
        ]

    def _lm_pre(self, module, args, kwargs):
        self.settle_forwards(backward=False)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and args:
            embeds = args[0]
        if embeds is not None:
            # with a prefix cache (window_prefix=cached) the tokens attend to the cached ones too
            cache = kwargs.get("past_key_values")
            cached = int(cache.get_seq_length()) if cache is not None else 0
            self._pending.append((int(embeds.shape[0]), int(embeds.shape[1]), cached + int(embeds.shape[1])))
        self.switch.switch(STUDENT_FWD_BWD)

    def _after_forward(self, module, args, output):
        self.switch.switch(LOSS)

    def settle_forwards(self, backward: bool) -> None:
        """Count the pending forwards: with backward FLOPs if a backward followed them."""
        s = self.shape
        for rows, length, seq_len in self._pending:
            tokens = rows * length
            if backward:
                flops = tokens * train_flops_per_token(s, seq_len)
                executed = tokens * executed_train_flops_per_token(
                    s, seq_len, self.trainable_params, self.lowest_trainable_layer
                )
            else:
                flops = executed = tokens * frozen_forward_flops_per_token(s, seq_len)
            self.counts.add(STUDENT_FWD_BWD, flops, executed=executed)
        self._pending = []

    def end_step(self) -> StepCounts:
        self.switch.switch(None)
        self.settle_forwards(backward=False)
        counts, self.counts = self.counts, StepCounts()
        return counts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class TimedUpdater:
    """An updater with backward under ``student_fwd_bwd`` and the step under ``optimizer``."""

    def __init__(self, inner, instruments: StudentInstruments):
        self.inner, self.instruments = inner, instruments

    def backward(self, loss: torch.Tensor) -> None:
        self.instruments.settle_forwards(backward=True)
        self.instruments.switch.switch(STUDENT_FWD_BWD)
        self.inner.backward(loss)
        self.instruments.switch.switch(None)

    def step(self) -> None:
        self.instruments.switch.switch(OPTIMIZER)
        self.inner.step()
        self.instruments.switch.switch(None)

    def zero_grad(self) -> None:
        self.instruments.switch.switch(OPTIMIZER)
        self.inner.zero_grad()
        self.instruments.switch.switch(None)

    def global_any(self, flag: bool) -> bool:
        return self.inner.global_any(flag)

    def global_max(self, value: int) -> int:
        return self.inner.global_max(value)
