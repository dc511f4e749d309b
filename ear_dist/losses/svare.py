"""S-VARE losses, on a single-codebook model (Janus) and on a bitwise next-scale model (Infinity).

The student, conditioned on the target prompt c_t, is teacher-forced on the image
tokens the teacher generated for the surrogate prompt c_s. Its cross-entropy toward
those tokens counts only where it still gets them wrong; a preservation KL keeps the
student on c_s close to the teacher on c_s.

On a bitwise model (what S-VARE was made for) "wrong" is the paper's rule: a bit is
wrong when the student gives its label a probability under 1/2 (its cross-entropy
exceeds ln 2), and a token is unsafe when at least a quarter of its bits are wrong. An
unsafe token's loss is the mean cross-entropy of its bits; the sum over unsafe tokens is
divided by B * T. The preservation term is the per-bit KL(teacher || student), averaged
over bits and tokens. On a codebook model the analog is the label's probability under
``label_prob_max`` (or :func:`code_distance_filter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ear_dist.losses.windowed_reference import per_token_kl

__all__ = ["SVareLoss", "bit_error_filter", "bitwise_filtered_ce", "bitwise_preservation_kl", "bitwise_svare_loss",
           "code_distance_filter", "filtered_ce", "preservation_kl", "svare_loss"]


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


def _bit_pairs(logits: torch.Tensor) -> torch.Tensor:
    """Bitwise head logits [B, T, 2 * bits] -> [B, T, bits, 2] in float32 (bit j's logits at 2j, 2j+1)."""
    if logits.shape[-1] % 2:
        raise ValueError(f"bitwise logits {tuple(logits.shape)}: the last dimension must hold two logits per bit")
    return logits.float().reshape(*logits.shape[:-1], -1, 2)


def bit_error_filter(student_logits: torch.Tensor, label_bits: torch.Tensor, min_error_share: float = 0.25
                     ) -> torch.Tensor:
    """Unsafe tokens [B, T] (bool): at least ``min_error_share`` of the bits get probability under 1/2 for their label.

    ``student_logits`` [B, T, 2 * bits], ``label_bits`` [B, T, bits] (0/1). A bit with
    equal logits is not wrong (its cross-entropy is exactly ln 2). No gradient.
    """
    with torch.no_grad():
        pairs = _bit_pairs(student_logits.detach())
        if tuple(pairs.shape[:-1]) != tuple(label_bits.shape):
            raise ValueError(f"student_logits {tuple(student_logits.shape)} and label_bits {tuple(label_bits.shape)}: "
                             "expected [B, T, 2 * bits] and [B, T, bits]")
        label = pairs.gather(-1, label_bits.long().unsqueeze(-1)).squeeze(-1)
        other = pairs.gather(-1, (1 - label_bits.long()).unsqueeze(-1)).squeeze(-1)
        wrong = label < other
        return wrong.float().mean(-1) >= min_error_share


def bitwise_filtered_ce(student_logits: torch.Tensor, label_bits: torch.Tensor, min_error_share: float = 0.25
                        ) -> tuple[torch.Tensor, int]:
    """Mean bit cross-entropy of the unsafe tokens (:func:`bit_error_filter`), summed, over ``B * T``.

    Returns ``(loss, num_counted)``; tokens that are not unsafe get an exactly zero gradient.
    """
    unsafe = bit_error_filter(student_logits, label_bits, min_error_share)
    log_q = torch.log_softmax(_bit_pairs(student_logits), dim=-1)
    bit_nll = -log_q.gather(-1, label_bits.long().unsqueeze(-1)).squeeze(-1)
    token_loss = bit_nll.mean(-1)
    loss = torch.where(unsafe, token_loss, torch.zeros_like(token_loss)).sum() / max(unsafe.numel(), 1)
    return loss, int(unsafe.sum())


def bitwise_preservation_kl(student_logits_on_surrogate: torch.Tensor, teacher_logits_on_surrogate: torch.Tensor
                            ) -> torch.Tensor:
    """Per-bit KL(teacher || student), averaged over bits, tokens and rows (a scalar)."""
    pairs_s = _bit_pairs(student_logits_on_surrogate)
    return per_token_kl(pairs_s, _bit_pairs(teacher_logits_on_surrogate)).mean()


def bitwise_svare_loss(student_logits_on_target: torch.Tensor, label_bits: torch.Tensor,
                       student_logits_on_surrogate: torch.Tensor, teacher_logits_on_surrogate: torch.Tensor,
                       min_error_share: float = 0.25, preserve_weight: float = 0.5) -> SVareLoss:
    """S-VARE on a bitwise head: filtered bit cross-entropy on c_t + weighted per-bit preservation KL on c_s."""
    ce, num_counted = bitwise_filtered_ce(student_logits_on_target, label_bits, min_error_share)
    preserve = bitwise_preservation_kl(student_logits_on_surrogate, teacher_logits_on_surrogate)
    return SVareLoss(loss=ce + preserve_weight * preserve, ce=ce, preserve=preserve, num_counted=num_counted)
