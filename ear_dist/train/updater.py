"""The seam between the step and the optimizer: backward, step, zero_grad, and rank agreement.

``global_any`` / ``global_max`` are where data-parallel ranks agree on whether to step
(the DeepSpeed updater in ``ear_dist.distributed.deepspeed_engine`` all-reduces them);
in one process they are the identity. The benchmark wraps an updater to time the
phases of the real step.

A model in bfloat16 or float16 trained without DeepSpeed steps through
``MasterWeightUpdater``: Adam on float32 master copies, rounded back into the model after
each step, as DeepSpeed's mixed-precision optimizers do. Adam directly on bfloat16
weights loses every update smaller than half a bfloat16 step of the weight (at lr 1e-4
most elements above ~0.03 in magnitude never move), so one GPU and N GPUs would train
different students.
"""

from __future__ import annotations

from typing import Callable, Sequence

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


class MasterWeightUpdater(Updater):
    """The optimizer steps float32 masters of low-precision trainable tensors; the model gets them rounded.

    ``build_optimizer`` receives the masters (fresh float32 leaves). Backward still runs
    in the model's dtype; the gradients are widened to float32 before the step.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter],
                 build_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in self.params]
        super().__init__(build_optimizer(self.masters))

    def step(self) -> None:
        for p, master in zip(self.params, self.masters):
            master.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
        self.optimizer.step()
        self._copy_to_model()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def _copy_to_model(self) -> None:
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                p.copy_(master)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "master_weights": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for master, saved in zip(self.masters, state["master_weights"]):
                master.copy_(saved)
        self._copy_to_model()
