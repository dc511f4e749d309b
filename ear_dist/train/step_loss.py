"""The erasure step's loss, in one place: the teacher's raw outputs in, the windowed, masked loss out.

``windowed_loss(...)`` builds the guided target from the teacher's outputs on the
target, surrogate (and unconditional) prompts with per-row erasure guidance, then
per-token loss -> window sums -> threshold mask -> scaled loss, either with the
plain-PyTorch reference (``ear_dist.losses.windowed_reference``) or with the fused Triton kernels
(``ear_dist.kernels.windowed_fused``), which build the target in registers and never
materialise a ``[B, T, V]`` target. The numbers are the same either way (float32
arithmetic; the tests compare values and gradients). ``erase.loss_backend`` selects
the backend. This module sits above both implementations, so imports run one way:
train -> kernels -> losses.
"""

from __future__ import annotations

import importlib.util
import os
import typing
from typing import Optional, Union

import torch

from ear_dist.config.schema import LossBackend, TargetMode
from ear_dist.losses.windowed_reference import (
    WindowedLoss,
    guidance_combine,
    guided_target,
    per_token_kl,
    per_token_mse,
    windowed_masked_loss,
)

__all__ = ["reference_windowed_loss", "resolve_backend", "triton_available", "windowed_loss"]

BACKENDS = typing.get_args(LossBackend)  # the values of erase.loss_backend
MODES = typing.get_args(TargetMode)  # the values of erase.target_mode


def triton_available() -> bool:
    """Whether the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` for CUDA tensors when triton is importable, else ``torch``.

    ``triton`` is honoured on CUDA, and on the CPU only under ``TRITON_INTERPRET=1``
    (the interpreter is for tests, not speed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"erase.loss_backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("erase.loss_backend=triton: the triton package is not installed (pip install triton)")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"erase.loss_backend=triton: tensors are on {device}; Triton needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run the kernels on the CPU for testing). Use auto or torch."
        )
    return "triton"


def windowed_loss(
    mode: str,
    student: torch.Tensor,
    on_target: torch.Tensor,
    on_surrogate: torch.Tensor,
    window_index: torch.Tensor,
    loss_threshold: Union[float, torch.Tensor],
    erase_guidance: Union[float, torch.Tensor],
    uncond: Optional[torch.Tensor] = None,
    guidance_weight: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
    logit_groups: int = 1,
) -> WindowedLoss:
    """The EAR loss of one batch: guided target, per-token loss, WGA windows, TLM mask.

    ``mode``: ``hidden`` (MSE on last hidden states ``[B, T, H]``) or ``logit``
    (KL(guided || student) on generation-head logits ``[B, T, V]``). ``student`` is the
    student's output on the target prompt; ``on_target`` / ``on_surrogate`` the frozen
    teacher's on the target / surrogate prompt (constants). ``window_index`` ``[B, T]``
    from :func:`ear_dist.losses.windowed_reference.window_index`. ``loss_threshold`` and
    ``erase_guidance``: a float or one value per row. Logit mode only: ``uncond``, the
    teacher's logits on the unconditional prompt; when given, teacher-side CFG with
    ``guidance_weight`` is applied to both prompts' logits before the guidance. A window
    id of -1 marks a token outside every window (no loss, zero gradient). ``scale``
    defaults to ``1 / (B * T)``. ``backend``: auto | torch | triton. ``logit_groups`` > 1: a
    bitwise head's logits (that many two-way softmaxes; the KL is summed over them), which
    the PyTorch reference computes (``auto`` picks it; the fused kernels take one softmax
    per token).
    """
    if mode not in MODES:
        raise ValueError(f"erase.target_mode: {mode!r} is not one of {', '.join(MODES)}")
    for name, tensor in (("on_target", on_target), ("on_surrogate", on_surrogate), ("uncond", uncond)):
        if tensor is not None and tensor.shape != student.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must have the student's shape {tuple(student.shape)}")
    if student.dim() != 3:
        raise ValueError(f"student: expected [B, T, D], got shape {tuple(student.shape)}")
    if tuple(window_index.shape) != tuple(student.shape[:2]):
        raise ValueError(f"window_index {tuple(window_index.shape)} must be [B, T] = {tuple(student.shape[:2])}")
    if uncond is not None and mode != "logit":
        raise ValueError("uncond: teacher-side CFG exists only in logit mode")

    if logit_groups > 1 and mode == "logit":
        if backend == "triton":
            raise ValueError("erase.loss_backend=triton: the fused kernels take one softmax per token; a bitwise "
                             "head's logit-mode loss runs on the torch backend (auto or torch)")
        resolve_backend(backend, student.device)
        backend = "torch"
    if resolve_backend(backend, student.device) == "triton":
        from ear_dist.kernels.windowed_fused import fused_windowed_loss

        return fused_windowed_loss(
            mode, student, on_target, on_surrogate, window_index, loss_threshold, erase_guidance,
            uncond=uncond, guidance_weight=guidance_weight, scale=scale,
        )
    return reference_windowed_loss(
        mode, student, on_target, on_surrogate, window_index, loss_threshold, erase_guidance,
        uncond=uncond, guidance_weight=guidance_weight, scale=scale, logit_groups=logit_groups,
    )


def reference_windowed_loss(
    mode: str,
    student: torch.Tensor,
    on_target: torch.Tensor,
    on_surrogate: torch.Tensor,
    window_index: torch.Tensor,
    loss_threshold: Union[float, torch.Tensor],
    erase_guidance: Union[float, torch.Tensor],
    uncond: Optional[torch.Tensor] = None,
    guidance_weight: float = 0.0,
    scale: Optional[float] = None,
    logit_groups: int = 1,
) -> WindowedLoss:
    """The plain-PyTorch composition of the reference losses (the ``torch`` backend)."""
    if isinstance(erase_guidance, torch.Tensor) and erase_guidance.numel() > 1:
        erase_guidance = erase_guidance.to(student.device).reshape(-1, 1, 1)
    # built in (at least) float32 from the raw outputs, as the kernels do in registers
    def up(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.promote_types(t.dtype, torch.float32))

    target = guided_target(up(on_target), up(on_surrogate), erase_guidance)
    if uncond is not None:
        target = guidance_combine(target, up(uncond), guidance_weight)
    per_token = per_token_mse(student, target) if mode == "hidden" else per_token_kl(student, target, logit_groups)
    return windowed_masked_loss(per_token, window_index, loss_threshold, scale=scale)
