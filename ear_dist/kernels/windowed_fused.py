"""Fused Triton kernels for the windowed, threshold-masked EAR loss.

Two launches per call, both one program per image token (row of the flattened
``[B * T, D]`` inputs), chunked over D (the 16384 codes in logit mode, the hidden width
in hidden mode):

1. ``*_loss_kernel``: builds the guided target in registers from the teacher outputs
   (target prompt, surrogate prompt, and in logit mode an optional unconditional row
   for teacher-side CFG), and writes the per-token loss. Logit mode uses an online
   (streaming) log-sum-exp over both the target and the student logits and also keeps
   the two log-sum-exps for pass 2.
2. Between the launches, a few tiny torch ops over ``[B, T]`` (the same
   ``window_sums`` the reference uses): window sums with per-row window ids, the
   threshold mask, and one gradient coefficient per token (``scale`` for tokens of kept
   windows, 0 otherwise).
3. ``*_grad_kernel``: writes the gradient with respect to the student input, scaled
   by that coefficient. Tokens of masked windows read nothing and store exact zeros.

The gradient is computed in the forward call (as Liger-Kernel does for its fused
losses), so neither the teacher outputs nor any ``[B, T, D]`` float32 intermediate is
kept alive until backward: only one gradient buffer in the student's dtype. Backward
multiplies it in place by the incoming scalar gradient (a no-op kernel when that is 1).

The guided target and all arithmetic are float32 whatever the input dtype. The
plain-PyTorch definition is ``ear_dist.losses.windowed_reference``; the tests compare the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ear_dist.losses.windowed_reference import WindowedLoss, thresholds, token_keep, window_sums

__all__ = ["fused_windowed_loss"]


# --------------------------------------------------------------------------- logit mode


@triton.jit
def _guided_logits(
    target_ptr, surrogate_ptr, uncond_ptr, row_offset, offs, mask, eta, guidance_weight,
    HAS_UNCOND: tl.constexpr,
):
    """Guided target logits of one chunk in float32 (0 outside the row)."""
    on_target = tl.load(target_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
    on_surrogate = tl.load(surrogate_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
    guided = on_surrogate - eta * (on_target - on_surrogate)
    if HAS_UNCOND:
        # CFG on both prompts with a shared unconditional row folds into one combine:
        # u + w (s - u) - eta (u + w (t - u) - u - w (s - u)) = u + w (guided - u)
        uncond = tl.load(uncond_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
        guided = uncond + guidance_weight * (guided - uncond)
    return guided


@triton.jit
def _kl_loss_kernel(
    student_ptr, target_ptr, surrogate_ptr, uncond_ptr, eta_ptr,
    loss_ptr, lse_student_ptr, lse_target_ptr,
    guidance_weight, num_tokens, vocab,
    HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    row_offset = token.to(tl.int64) * vocab
    eta = tl.load(eta_ptr + token // num_tokens)
    # running maxima, rescaled sums of exp, and the target-weighted sum of (z - s)
    max_target = tl.full([], float("-inf"), tl.float32)
    max_student = tl.full([], float("-inf"), tl.float32)
    sum_target = tl.zeros([], tl.float32)
    sum_student = tl.zeros([], tl.float32)
    weighted_diff = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        guided = _guided_logits(target_ptr, surrogate_ptr, uncond_ptr, row_offset, offs, mask, eta, guidance_weight,
                                HAS_UNCOND)
        student = tl.load(student_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
        # lanes past the row end: -inf for the log-sum-exps, a difference of 0
        z = tl.where(mask, guided, float("-inf"))
        s = tl.where(mask, student, float("-inf"))

        new_max_target = tl.maximum(max_target, tl.max(z, axis=0))
        # equal maxima (also both -inf) need no rescaling; avoids exp(-inf - -inf)
        rescale_target = tl.where(new_max_target == max_target, 1.0, tl.exp(max_target - new_max_target))
        exp_target = tl.exp(z - new_max_target)
        # codes of target probability 0 contribute 0 (the reference's convention)
        diff_terms = tl.where(exp_target > 0, exp_target * (guided - student), 0.0)
        sum_target = sum_target * rescale_target + tl.sum(exp_target, axis=0)
        weighted_diff = weighted_diff * rescale_target + tl.sum(diff_terms, axis=0)
        max_target = new_max_target

        new_max_student = tl.maximum(max_student, tl.max(s, axis=0))
        rescale_student = tl.where(new_max_student == max_student, 1.0, tl.exp(max_student - new_max_student))
        sum_student = sum_student * rescale_student + tl.sum(tl.exp(s - new_max_student), axis=0)
        max_student = new_max_student

    lse_target = max_target + tl.log(sum_target)
    lse_student = max_student + tl.log(sum_student)
    # KL(p || q) = sum p (z - s) - lse(z) + lse(s)
    kl = weighted_diff / sum_target - lse_target + lse_student
    tl.store(loss_ptr + token, kl)
    tl.store(lse_target_ptr + token, lse_target)
    tl.store(lse_student_ptr + token, lse_student)


@triton.jit
def _kl_grad_kernel(
    student_ptr, target_ptr, surrogate_ptr, uncond_ptr, eta_ptr,
    lse_student_ptr, lse_target_ptr, coef_ptr, grad_ptr,
    guidance_weight, num_tokens, vocab,
    HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    row_offset = token.to(tl.int64) * vocab
    coef = tl.load(coef_ptr + token)
    if coef == 0.0:
        # a masked window: no reads, exact zeros
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zeros = tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + row_offset + offs, zeros, mask=offs < vocab)
    else:
        eta = tl.load(eta_ptr + token // num_tokens)
        lse_target = tl.load(lse_target_ptr + token)
        lse_student = tl.load(lse_student_ptr + token)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < vocab
            z = _guided_logits(target_ptr, surrogate_ptr, uncond_ptr, row_offset, offs, mask, eta, guidance_weight,
                               HAS_UNCOND)
            s = tl.load(student_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            # d KL / d s = softmax(s) - softmax(z)
            grad = coef * (tl.exp(s - lse_student) - tl.exp(z - lse_target))
            tl.store(grad_ptr + row_offset + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- hidden mode


@triton.jit
def _mse_loss_kernel(
    student_ptr, target_ptr, surrogate_ptr, eta_ptr, loss_ptr,
    num_tokens, width,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    row_offset = token.to(tl.int64) * width
    eta = tl.load(eta_ptr + token // num_tokens)
    sq_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < width
        s = tl.load(student_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
        on_target = tl.load(target_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
        on_surrogate = tl.load(surrogate_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
        diff = s - (on_surrogate - eta * (on_target - on_surrogate))
        sq_sum += tl.where(mask, diff * diff, 0.0)
    tl.store(loss_ptr + token, tl.sum(sq_sum, axis=0) / width)


@triton.jit
def _mse_grad_kernel(
    student_ptr, target_ptr, surrogate_ptr, eta_ptr, coef_ptr, grad_ptr,
    num_tokens, width,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    row_offset = token.to(tl.int64) * width
    coef = tl.load(coef_ptr + token)
    if coef == 0.0:
        for start in range(0, width, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zeros = tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty)
            tl.store(grad_ptr + row_offset + offs, zeros, mask=offs < width)
    else:
        eta = tl.load(eta_ptr + token // num_tokens)
        factor = 2.0 * coef / width
        for start in range(0, width, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < width
            s = tl.load(student_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            on_target = tl.load(target_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            on_surrogate = tl.load(surrogate_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            diff = s - (on_surrogate - eta * (on_target - on_surrogate))
            tl.store(grad_ptr + row_offset + offs, (factor * diff).to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward


@triton.jit
def _scale_inplace_kernel(grad_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """``grad *= factor`` with the factor read on the device: no host sync, and no
    memory traffic at all in the usual case of a factor of exactly 1."""
    factor = tl.load(factor_ptr)
    if factor != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (grad * factor).to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- autograd


def _block_size(width: int, block_size: Optional[int]) -> int:
    if block_size is not None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {block_size}")
        return block_size
    return min(triton.next_power_of_2(width), 4096)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


class _WindowedLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, on_target, on_surrogate, uncond, window_index, loss_threshold, eta_rows,
                guidance_weight, scale, mode, block_size, compute_grad):
        batch, num_tokens, width = student.shape
        rows = batch * num_tokens
        student_2d = student.reshape(rows, width).contiguous()
        target_2d = on_target.reshape(rows, width).contiguous()
        surrogate_2d = on_surrogate.reshape(rows, width).contiguous()
        uncond_2d = uncond.reshape(rows, width).contiguous() if uncond is not None else target_2d
        block = _block_size(width, block_size)
        warps = _num_warps(block)
        grid = (rows,)
        device = student.device

        per_token = torch.empty(rows, dtype=torch.float32, device=device)
        if mode == "logit":
            lse_student = torch.empty(rows, dtype=torch.float32, device=device)
            lse_target = torch.empty(rows, dtype=torch.float32, device=device)
            _kl_loss_kernel[grid](
                student_2d, target_2d, surrogate_2d, uncond_2d, eta_rows,
                per_token, lse_student, lse_target,
                float(guidance_weight), num_tokens, width,
                HAS_UNCOND=uncond is not None, BLOCK=block, num_warps=warps,
            )
        else:
            _mse_loss_kernel[grid](
                student_2d, target_2d, surrogate_2d, eta_rows, per_token,
                num_tokens, width, BLOCK=block, num_warps=warps,
            )
        per_token = per_token.view(batch, num_tokens)

        window_loss, window_exists, kept = window_sums(per_token, window_index, loss_threshold)
        loss = torch.where(kept, window_loss, torch.zeros_like(window_loss)).sum() * scale
        # d loss / d per_token: scale on tokens of kept windows, exactly 0 elsewhere
        token_coef = token_keep(kept, window_index).to(torch.float32) * scale

        grad = None
        if compute_grad:
            grad = torch.empty((rows, width), dtype=student.dtype, device=device)
            if mode == "logit":
                _kl_grad_kernel[grid](
                    student_2d, target_2d, surrogate_2d, uncond_2d, eta_rows,
                    lse_student, lse_target, token_coef.reshape(-1), grad,
                    float(guidance_weight), num_tokens, width,
                    HAS_UNCOND=uncond is not None, BLOCK=block, num_warps=warps,
                )
            else:
                _mse_grad_kernel[grid](
                    student_2d, target_2d, surrogate_2d, eta_rows, token_coef.reshape(-1), grad,
                    num_tokens, width, BLOCK=block, num_warps=warps,
                )
            grad = grad.view(batch, num_tokens, width)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_token, window_loss, window_exists, kept)
        return loss, per_token, window_loss, window_exists, kept

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 12
        if getattr(ctx, "grad_consumed", False):
            raise RuntimeError(
                "the fused windowed loss computes its gradient in the forward pass and scales it in "
                "place in backward; a second backward through the same graph is not supported"
            )
        ctx.grad_consumed = True
        # in place: the buffer is ours alone, and this avoids a second [B, T, D] tensor
        factor = grad_loss.detach().to(device=grad.device, dtype=torch.float32).reshape(1).contiguous()
        block = 4096
        _scale_inplace_kernel[(triton.cdiv(grad.numel(), block),)](grad, factor, grad.numel(), BLOCK=block)
        return (grad,) + (None,) * 11


def fused_windowed_loss(
    mode: str,
    student: torch.Tensor,
    on_target: torch.Tensor,
    on_surrogate: torch.Tensor,
    window_index: torch.Tensor,
    loss_threshold,
    erase_guidance,
    uncond: Optional[torch.Tensor] = None,
    guidance_weight: float = 0.0,
    scale: Optional[float] = None,
    block_size: Optional[int] = None,
) -> WindowedLoss:
    """The windowed, threshold-masked loss through the Triton kernels.

    Same contract and numbers as ``ear_dist.train.step_loss.windowed_loss`` with
    ``backend="torch"``; see there for the arguments. ``block_size`` (a power of two)
    sets the chunk over the last dimension; by default the whole width up to 4096.
    """
    if mode not in ("hidden", "logit"):
        raise ValueError(f"mode: {mode!r} is not one of hidden, logit")
    if uncond is not None and mode != "logit":
        raise ValueError("uncond: teacher-side CFG exists only in logit mode")
    batch, num_tokens = student.shape[0], student.shape[1]
    device = student.device
    eta_rows = _per_row(erase_guidance, batch, device, "erase_guidance")
    thr = thresholds(batch, loss_threshold, device)
    if scale is None:
        scale = 1.0 / max(batch * num_tokens, 1)
    loss, per_token, window_loss, window_exists, kept = _WindowedLossFunction.apply(
        student, on_target.detach(), on_surrogate.detach(),
        uncond.detach() if uncond is not None else None,
        window_index, thr, eta_rows, float(guidance_weight), float(scale), mode, block_size,
        # forward runs with grad mode off, so ask here: no gradient pass under no_grad
        student.requires_grad and torch.is_grad_enabled(),
    )
    return WindowedLoss(loss=loss, window_loss=window_loss, kept=kept, window_exists=window_exists, per_token=per_token)


def _per_row(value, batch: int, device, name: str) -> torch.Tensor:
    """A float or a tensor of one value per row, as a contiguous float32 ``[B]``."""
    if isinstance(value, torch.Tensor):
        out = value.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if out.numel() == 1:
            out = out.expand(batch)
        if out.numel() != batch:
            raise ValueError(f"{name}: expected one value per row ({batch}), got {out.numel()}")
        return out.contiguous()
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)
