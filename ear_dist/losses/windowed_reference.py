"""Reference (plain PyTorch) losses of the EAR erasure step.

The order of operations is the one of the paper:

1. a guided target from the frozen teacher on the target prompt c_t and on the
   surrogate prompt c_s: ``target = on_surrogate - erase_guidance * (on_target - on_surrogate)``;
2. a per-token loss of the student (conditioned on c_t) against that target: MSE on
   hidden states, or KL(target || student) on generation-head logits;
3. Windowed Gradient Accumulation (WGA): per-token losses summed over windows of
   ``window_len`` image tokens (generation order, or a random order);
4. Thresholded Loss Masking (TLM): a window whose sum is below ``loss_threshold``
   contributes nothing, and its tokens get an exactly zero gradient.

These functions are the definition the fused Triton kernels
(``ear_dist.kernels.windowed_fused``) are tested against; ``ear_dist.train.step_loss``
picks one or the other with the same numbers either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "WindowedLoss",
    "guidance_combine",
    "guided_target",
    "per_token_kl",
    "per_token_mse",
    "scale_window_index",
    "window_index",
    "token_keep",
    "window_lengths",
    "window_sums",
    "windowed_masked_loss",
]


def guided_target(
    on_target: torch.Tensor, on_surrogate: torch.Tensor, erase_guidance: Union[float, torch.Tensor]
) -> torch.Tensor:
    """Erasure target from teacher outputs on the target and surrogate prompts.

    ``on_surrogate - erase_guidance * (on_target - on_surrogate)``: the surrogate
    output pushed away from the concept direction. Works for hidden states and logits
    alike. A tensor ``erase_guidance`` must broadcast against the inputs (e.g. shape
    ``[B, 1, 1]`` for a per-row guidance).
    """
    return on_surrogate - erase_guidance * (on_target - on_surrogate)


def guidance_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_weight: Union[float, torch.Tensor]
                     ) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + guidance_weight * (cond - uncond)``.

    Teacher-side guidance in logit mode. Applied to the guided target it equals applying
    it to the target-prompt and surrogate-prompt logits first, since both share the
    unconditional row: ``u + w (s - u) - eta (w (t - u) - w (s - u)) = u + w (guided - u)``.
    """
    return uncond + guidance_weight * (cond - uncond)


def per_token_mse(student_hidden: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over the hidden width of the squared error, ``[B, T, H] -> [B, T]``, in float32.

    The target is treated as a constant (no gradient flows into it).
    """
    _check_same_shape(student_hidden, target_hidden, "student_hidden", "target_hidden")
    diff = student_hidden.float() - target_hidden.detach().float()
    return diff.square().mean(dim=-1)


def per_token_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """KL(softmax(target) || softmax(student)) per token, ``[B, T, V] -> [B, T]``, in float32.

    Both sides go through a stable log-softmax in float32; the target is a constant.
    Codes the target gives probability exactly zero (e.g. logits of -inf) contribute
    zero, as in the definition of KL. ``groups`` > 1: the V logits are that many
    independent softmaxes (a bitwise head: two logits per bit) and the token's KL is
    their sum.
    """
    _check_same_shape(student_logits, target_logits, "student_logits", "target_logits")
    if groups > 1:
        if student_logits.shape[-1] % groups:
            raise ValueError(f"logits of width {student_logits.shape[-1]} do not split into {groups} groups")
        kl = per_token_kl(student_logits.reshape(*student_logits.shape[:-1], groups, -1),
                          target_logits.reshape(*target_logits.shape[:-1], groups, -1))
        return kl.sum(dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(target_logits.detach().float(), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def window_lengths(
    batch: int, window_len: Union[int, torch.Tensor], device: Optional[torch.device] = None
) -> torch.Tensor:
    """``window_len`` (an int, or one length per row) as a LongTensor ``[B]``; checks it is >= 1."""
    if isinstance(window_len, torch.Tensor):
        lengths = window_len.to(device=device, dtype=torch.long).reshape(-1)
        if lengths.numel() == 1 and batch != 1:
            lengths = lengths.expand(batch)
        if lengths.numel() != batch:
            raise ValueError(f"window_len: expected one length per row ({batch}), got {lengths.numel()}")
    else:
        lengths = torch.full((batch,), int(window_len), dtype=torch.long, device=device)
    if batch and int(lengths.min()) < 1:
        row = int(torch.argmin(lengths))
        raise ValueError(f"window_len: row {row} has window length {int(lengths[row])}; expected >= 1")
    return lengths


def window_index(
    batch: int,
    num_tokens: int,
    window_len: Union[int, torch.Tensor],
    order: str = "sequential",
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Window id of every image-token position, a LongTensor ``[B, T]``.

    ``window_len`` is an int or a LongTensor ``[B]`` (one length per row, so a batch can
    mix concepts). ``sequential``: ``position // window_len`` in generation order; the
    last window of a row may be partial. ``random``: each row's positions are shuffled
    (by ``generator``, a CPU generator) and the shuffled sequence is cut into windows of
    ``window_len``; every position lands in exactly one window. A window length larger
    than ``num_tokens`` gives a single window.
    """
    lengths = window_lengths(batch, window_len, device=device)
    positions = torch.arange(num_tokens, dtype=torch.long, device=device)
    # rank of each position: its place in the (possibly shuffled) order of the row
    if order == "sequential":
        rank = positions.unsqueeze(0).expand(batch, num_tokens)
    elif order == "random":
        # argsort of uniform noise is a uniform random permutation per row
        noise = torch.rand(batch, num_tokens, generator=generator)
        perm = noise.argsort(dim=1).to(device)
        rank = torch.empty_like(perm)
        rank.scatter_(1, perm, positions.unsqueeze(0).expand(batch, num_tokens).contiguous())
    else:
        raise ValueError(f"window order: {order!r} is not one of sequential, random")
    return torch.div(rank, lengths.unsqueeze(1), rounding_mode="floor")


def scale_window_index(
    batch: int,
    scale_sizes: Sequence[int],
    scales_per_window: int,
    order: str = "sequential",
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Window ids ``[B, T]`` over a next-scale model's tokens: every window is ``scales_per_window`` whole scales.

    ``scale_sizes``: tokens per scale, coarse to fine (T is their sum). ``sequential``:
    scales in generation order; ``random``: each row's scales in a random order (by
    ``generator``, a CPU generator) before they are grouped. A scale is predicted in one
    forward, so windows never split one.
    """
    if scales_per_window < 1:
        raise ValueError(f"erase.window_scales: expected >= 1, got {scales_per_window}")
    sizes = torch.tensor(list(scale_sizes), dtype=torch.long)
    num_scales = len(sizes)
    if order == "sequential":
        rank = torch.arange(num_scales).expand(batch, num_scales)
    elif order == "random":
        perm = torch.rand(batch, num_scales, generator=generator).argsort(dim=1)
        rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(num_scales).expand(batch, num_scales).contiguous())
    else:
        raise ValueError(f"window order: {order!r} is not one of sequential, random")
    window_of_scale = torch.div(rank, scales_per_window, rounding_mode="floor")
    scale_of_token = torch.repeat_interleave(torch.arange(num_scales), sizes)
    return window_of_scale[:, scale_of_token].to(device)


@dataclass
class WindowedLoss:
    """Result of the windowed, threshold-masked loss.

    ``loss``: the scalar to backpropagate (``scale`` times the sum of kept window sums).
    ``window_loss`` ``[B, W]``: per-window sums of per-token losses (0 where a window
    does not exist in a row). ``kept`` ``[B, W]``: the window exists and its sum is
    >= the row's threshold. ``window_exists`` ``[B, W]``. ``per_token`` ``[B, T]``: the
    per-token losses, detached, for reporting.
    """

    loss: torch.Tensor
    window_loss: torch.Tensor
    kept: torch.Tensor
    window_exists: torch.Tensor
    per_token: torch.Tensor

    @property
    def num_windows(self) -> int:
        """How many windows exist in the batch (reporting; synchronises with the device)."""
        return int(self.window_exists.sum())

    @property
    def num_kept(self) -> int:
        """How many windows passed the threshold (reporting; synchronises with the device)."""
        return int(self.kept.sum())


def thresholds(batch: int, loss_threshold: Union[float, torch.Tensor], device) -> torch.Tensor:
    """``loss_threshold`` (a float, or one per row) as a float32 tensor ``[B]``."""
    if isinstance(loss_threshold, torch.Tensor):
        out = loss_threshold.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if out.numel() == 1 and batch != 1:
            out = out.expand(batch)
        if out.numel() != batch:
            raise ValueError(f"loss_threshold: expected one threshold per row ({batch}), got {out.numel()}")
        return out
    return torch.full((batch,), float(loss_threshold), dtype=torch.float32, device=device)


def window_sums(
    per_token: torch.Tensor, window_index: torch.Tensor, loss_threshold: Union[float, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window sums ``[B, W]``, window existence and the TLM keep mask.

    A window id of -1 marks a token outside every window: it adds to no sum. The mask
    is computed on detached values, so it never carries gradient.
    """
    if per_token.dim() != 2 or per_token.shape != window_index.shape:
        raise ValueError(
            f"per-token losses {tuple(per_token.shape)} and window_index {tuple(window_index.shape)} "
            "must both be [B, T]"
        )
    batch = per_token.shape[0]
    num_windows = 0
    if window_index.numel():
        # one host sync for both the check and the number of windows
        lowest, highest = (int(v) for v in torch.aminmax(window_index))
        if lowest < -1:
            raise ValueError(f"window_index: window ids must be >= 0 (or -1: no window), got {lowest}")
        num_windows = highest + 1
    inside = window_index >= 0
    index = window_index.long().clamp(min=0)
    window_loss = per_token.new_zeros(batch, num_windows).scatter_add(
        1, index, torch.where(inside, per_token, torch.zeros_like(per_token)))
    counts = torch.zeros(batch, num_windows, dtype=torch.int32, device=per_token.device)
    counts.scatter_add_(1, index, inside.to(torch.int32))
    window_exists = counts > 0
    thr = thresholds(batch, loss_threshold, per_token.device)
    kept = window_exists & (window_loss.detach() >= thr.unsqueeze(1))
    return window_loss, window_exists, kept


def token_keep(kept: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """Per token ``[B, T]``: whether its window was kept (False outside every window)."""
    return kept.gather(1, window_index.long().clamp(min=0)) & (window_index >= 0)


def windowed_masked_loss(
    per_token: torch.Tensor,
    window_index: torch.Tensor,
    loss_threshold: Union[float, torch.Tensor],
    scale: Optional[float] = None,
) -> WindowedLoss:
    """WGA + TLM on per-token losses ``[B, T]`` with window ids ``[B, T]``.

    Per-token losses are summed per (row, window). A window is kept when it exists and
    its (detached) sum is >= ``loss_threshold`` (a float or one per row). The loss is
    ``scale * sum(kept window sums)``, with ``scale`` defaulting to ``1 / (B * T)``: the
    mean per supervised token, masked tokens counted in the denominator. Tokens of
    masked windows receive a gradient of exactly zero, and an all-masked batch gives a
    loss of 0 with zero gradients.
    """
    window_loss, window_exists, kept = window_sums(per_token, window_index, loss_threshold)
    if scale is None:
        scale = 1.0 / max(per_token.numel(), 1)
    # where (not a product with the mask) so that masked windows pass back an exact zero
    # even if their sum is inf or NaN
    kept_loss = torch.where(kept, window_loss, torch.zeros_like(window_loss))
    loss = kept_loss.sum() * scale
    return WindowedLoss(
        loss=loss,
        window_loss=window_loss.detach(),
        kept=kept,
        window_exists=window_exists,
        per_token=per_token.detach(),
    )


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")
