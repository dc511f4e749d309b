"""The seam between the step and the optimizer: backward, step, zero_grad, and rank agreement.

``global_any`` / ``global_max`` are where data-parallel ranks agree on whether to step
(the DeepSpeed updater in ``ear_dist.distributed.deepspeed_engine`` all-reduces them);
in one process they are the identity. The benchmark wraps an updater to time the
phases of the real step.
"""

from __future__ import annotations

import torch


class Updater:
    """backward/step/zero_grad over a plain torch optimizer (one process)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def global_any(self, flag: bool) -> bool:
        return flag

    def global_max(self, value: int) -> int:
        return value

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
