"""S-VARE losses on a single-codebook model (Janus).

The student, conditioned on the target prompt c_t, is teacher-forced on the image
tokens the teacher generated for the surrogate prompt c_s. Its cross-entropy toward
those tokens counts only where it still gets them wrong (probability of the label
below ``label_prob_max``); a preservation KL keeps the student on c_s close to the
teacher on c_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ear_dist.losses.windowed import per_token_kl

__all__ = ["SVareLoss", "code_distance_filter", "filtered_ce", "preservation_kl", "svare_loss"]


def code_distance_filter(student_logits: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor,
                         min_distance: float) -> torch.Tensor:
    """Tokens whose likeliest code lies far from the label's code in the VQ embedding space ``[B, T]`` (bool).

    S-VARE's rule on a bitwise model counts a token as unsafe when at least a quarter of
    its bits disagree with the label; random codes disagree on half their bits. The analog
    on a codebook model: the distance between the embeddings of the student's likeliest
    code and of the label, relative to the mean distance between two codes, is at least
    ``min_distance`` (0.5 = a quarter of the bits). A token whose prediction already is the
    label (distance 0) never counts.
    """
    with torch.no_grad():
        emb = codebook.detach().float()
        mean = torch.cdist(emb, emb).sum() / max(emb.shape[0] * (emb.shape[0] - 1), 1)
        pred = student_logits.detach().argmax(-1)
        dist = (emb[pred] - emb[labels.clamp(min=0)]).norm(dim=-1)
        return dist / mean.clamp(min=1e-12) >= min_distance


def filtered_ce(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    label_prob_max: float = 0.5,
    ignore_index: int = -100,
    unsafe: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy toward ``labels`` on the tokens the student still gets wrong.

    ``student_logits`` ``[B, T, V]``, ``labels`` ``[B, T]``. A token counts when the
    student's probability of its label is below ``label_prob_max`` (the mask is computed
    without gradient), or, when ``unsafe`` ``[B, T]`` is given, where it is True (e.g.
    :func:`code_distance_filter`), and its label is not ``ignore_index``. The sum over
    counted tokens is divided by ``B * T``. Returns ``(loss, num_counted)``; uncounted
    tokens get an exactly zero gradient.
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)}: "
            "expected [B, T, V] and [B, T]"
        )
    vocab = student_logits.shape[-1]
    valid = labels != ignore_index
    if bool(((labels < 0) & valid).any()) or bool((labels >= vocab).any()):
        bad = ((labels < 0) & valid) | (labels >= vocab)
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels: row {row}, position {pos} holds {int(labels[row, pos])}; expected a code in [0, {vocab})"
        )
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    label_log_prob = log_q.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        wrong = unsafe if unsafe is not None else label_log_prob.exp() < label_prob_max
        counted = valid & wrong
    nll = torch.where(counted, -label_log_prob, torch.zeros_like(label_log_prob))
    loss = nll.sum() / max(labels.numel(), 1)
    return loss, int(counted.sum())


def preservation_kl(
    student_logits_on_surrogate: torch.Tensor, teacher_logits_on_surrogate: torch.Tensor
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on the surrogate prompt (a scalar)."""
    return per_token_kl(student_logits_on_surrogate, teacher_logits_on_surrogate).mean()


@dataclass
class SVareLoss:
    """The S-VARE objective and its parts (``loss = ce + preserve_weight * preserve``)."""

    loss: torch.Tensor
    ce: torch.Tensor
    preserve: torch.Tensor
    num_counted: int


def svare_loss(
    student_logits_on_target: torch.Tensor,
    labels: torch.Tensor,
    student_logits_on_surrogate: torch.Tensor,
    teacher_logits_on_surrogate: torch.Tensor,
    label_prob_max: float = 0.5,
    preserve_weight: float = 0.5,
    ignore_index: int = -100,
    unsafe: Optional[torch.Tensor] = None,
) -> SVareLoss:
    """Filtered cross-entropy on c_t toward the surrogate tokens + weighted preservation KL on c_s."""
    ce, num_counted = filtered_ce(student_logits_on_target, labels, label_prob_max, ignore_index, unsafe)
    preserve = preservation_kl(student_logits_on_surrogate, teacher_logits_on_surrogate)
    return SVareLoss(loss=ce + preserve_weight * preserve, ce=ce, preserve=preserve, num_counted=num_counted)
