"""FLOPs of a white-box attack with a given budget, from the model's shape (``ear_dist.telemetry.flops``
conventions): what an attack measured on the world costs at the Janus-Pro-7B shape.

- targets: the base model's CFG rollouts of the concept prompts;
- a gradient pass: a teacher-forced forward of prompt + image tokens and the backward of the input gradients
  down to the prompt embeddings (no weight gradients: the model is frozen);
- a scoring pass (search): a teacher-forced forward only;
- the attack's images: CFG rollouts with the learned words or the found prompts.
"""

from __future__ import annotations

from ear_dist.eval.attacks.inversion import InversionBudget
from ear_dist.eval.attacks.search import SearchBudget
from ear_dist.telemetry.flops import (JanusFlopsShape, executed_train_flops_per_token, frozen_forward_flops_per_token,
                                      rollout_flops)


def _passes(shape: JanusFlopsShape, prompt_len: int, image_tokens: int) -> tuple[int, int]:
    """(FLOPs of one gradient pass, of one scoring pass) over one teacher-forced sequence."""
    seq = prompt_len + image_tokens - 1
    grad = seq * executed_train_flops_per_token(shape, seq, trainable_params=0, lowest_trainable_layer=0)
    return grad, seq * frozen_forward_flops_per_token(shape, seq)


def inversion_flops(shape: JanusFlopsShape, budget: InversionBudget, targets: int, prompt_len: int,
                    image_tokens: int) -> dict[str, int]:
    grad, _ = _passes(shape, prompt_len, image_tokens)
    parts = {"targets": rollout_flops(shape, prompt_len, image_tokens, targets),
             "optimisation": budget.steps * budget.batch * grad,
             "images": rollout_flops(shape, prompt_len, image_tokens, budget.images)}
    return {**parts, "total": sum(parts.values())}


def search_flops(shape: JanusFlopsShape, budget: SearchBudget, targets: int, prompt_len: int,
                 image_tokens: int) -> dict[str, int]:
    grad, score = _passes(shape, prompt_len, image_tokens)
    per_step = budget.batch * grad + (budget.candidates + 1) * budget.batch * score
    parts = {"targets": rollout_flops(shape, prompt_len, image_tokens, targets),
             "optimisation": budget.steps * per_step + 2 * budget.prompts * targets * score,
             "images": rollout_flops(shape, prompt_len, image_tokens, budget.images)}
    return {**parts, "total": sum(parts.values())}
