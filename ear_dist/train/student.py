"""The trainable student M, built from the teacher's model.

In one process the student owns copies of only the tensors it trains; every frozen
tensor is the teacher's own, shared read-only (no second copy of the model).
"""

from __future__ import annotations

import copy

import torch

from ear_dist.train.trainable import freeze_all_but


def make_student(teacher_model: torch.nn.Module, trainable: list[str], share_frozen: bool = True) -> torch.nn.Module:
    """A student whose ``trainable`` parameters are fresh copies and whose others alias the teacher's."""
    keep = set(trainable)
    memo = {}
    if share_frozen:
        for n, p in teacher_model.named_parameters():
            if n not in keep:
                memo[id(p)] = p
        for _, buf in teacher_model.named_buffers():
            memo[id(buf)] = buf
    student = copy.deepcopy(teacher_model, memo)
    freeze_all_but(student, trainable)
    student.train(False)  # no dropout in Janus, but keep the teacher's eval semantics explicit
    return student


def trainable_state(model: torch.nn.Module, trainable: list[str]) -> dict[str, torch.Tensor]:
    """The trained tensors, detached, on the CPU (what a delta stores)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu").contiguous().clone() for n in trainable}
