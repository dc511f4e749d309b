"""One erasure step per batch of prompt pairs: rollout -> targets -> loss -> windows -> mask -> update.

EAR (the default): the teacher samples image tokens (from the surrogate prompt unless
the pair brings its own), then builds guided targets by teacher forcing on both prompts
in one pass: ``target = M*(c_s) - eta * (M*(c_t) - M*(c_s))`` on the last hidden state
(``hidden`` mode, MSE) or on generation-head logits (``logit`` mode, KL). The student
is teacher-forced on c_t over all positions at once; per-token losses are summed over
windows of ``window_len`` tokens (WGA), and windows whose sum is under
``loss_threshold`` carry no gradient (TLM).

Update modes: ``window`` steps the optimizer after every kept window, in order, each
window's loss computed by the student as updated by the windows before it (the
paper); ``sequence`` takes all kept windows of the batch in one step.

Loss scale: ``sequence`` divides the kept window sums by the number of supervised
tokens (B*T); ``window`` divides one window's sum by its token count (B*len).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ear_dist.config import EraseConfig
from ear_dist.losses.dispatch import windowed_loss_from_target
from ear_dist.losses.svare import svare_loss
from ear_dist.losses.windowed import (
    cfg_combine,
    guided_target,
    per_token_kl,
    per_token_mse,
    window_index,
    windowed_masked_loss,
)
from ear_dist.models.janus import JanusBundle, teacher_forced
from ear_dist.teacher.engine import TeacherEngine, TeacherTargets


@dataclass
class PairBatch:
    """Prompt pairs of one step; ``tokens`` [B, T] are rollout tokens supplied with the pairs, if any."""

    target_prompts: list[str]
    surrogate_prompts: list[str]
    concepts: list[str]
    seeds: list[int]
    tokens: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.target_prompts)


@dataclass
class StepResult:
    loss: float
    windows_kept: int
    windows_total: int
    optimizer_steps: int
    image_tokens: int
    nonfinite: bool = False
    extras: dict = field(default_factory=dict)
    # concept -> [windows kept, windows total, summed window loss] of this rank's rows
    per_concept: dict = field(default_factory=dict)


def _per_concept(concepts, kept, exists, window_loss) -> dict:
    """Per-concept window counts and loss of one step (joint multi-concept runs)."""
    out: dict = {}
    for row, c in enumerate(concepts):
        rec = out.setdefault(c, [0, 0, 0.0])
        rec[0] += int(kept[row].sum())
        rec[1] += int(exists[row].sum())
        rec[2] += float(window_loss[row][exists[row]].sum())
    return out


class Updater:
    """backward/step/zero_grad over a plain torch optimizer (one process).

    ``global_any`` / ``global_max`` are where data-parallel ranks agree on whether to
    step (the DeepSpeed updater all-reduces them); in one process they are the identity.
    """

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


class ErasureStep:
    """Callable ``step(batch) -> StepResult`` binding a student, a teacher and an updater."""

    def __init__(self, student: torch.nn.Module, bundle: JanusBundle, teacher: TeacherEngine, cfg: EraseConfig,
                 updater: Updater, generator: Optional[torch.Generator] = None):
        self.student, self.bundle, self.teacher, self.cfg, self.updater = student, bundle, teacher, cfg, updater
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    # ----------------------------------------------------------------- per-concept settings
    def _per_row(self, concepts: Sequence[str], name: str, device) -> torch.Tensor:
        values = []
        for c in concepts:
            override = self.cfg.concepts.get(c)
            v = getattr(override, name) if override is not None else None
            values.append(getattr(self.cfg, name) if v is None else v)
        return torch.tensor(values, device=device)

    # ----------------------------------------------------------------- the step
    def __call__(self, batch: PairBatch) -> StepResult:
        cfg = self.cfg
        self._concepts = list(batch.concepts)
        tokens = self._rollout(batch)
        b, t = tokens.shape
        if cfg.method == "svare":
            return self._svare(batch, tokens)
        with_uncond = cfg.target_mode == "logit" and cfg.teacher_cfg_weight > 0
        teach = self.teacher.targets(batch.target_prompts, batch.surrogate_prompts, tokens, cfg.target_mode,
                                     with_uncond)
        target = self._guided(teach, batch.concepts)
        ids, mask = self.bundle.encode_prompts(batch.target_prompts)
        if cfg.method == "esd":
            return self._esd(ids, mask, tokens, target)
        window_len = self._per_row(batch.concepts, "window_len", tokens.device).long()
        if bool((window_len > t).any()):
            raise ValueError(f"erase.window_len: {int(window_len.max())} > the {t} image tokens per image")
        windows = window_index(b, t, window_len, cfg.window_order, generator=self.generator, device=tokens.device)
        threshold = self._per_row(batch.concepts, "loss_threshold", tokens.device).float()
        if cfg.update_mode == "sequence":
            return self._sequence(ids, mask, tokens, target, windows, threshold)
        return self._per_window(ids, mask, tokens, target, windows, threshold)

    def _rollout(self, batch: PairBatch) -> torch.Tensor:
        if batch.tokens is not None:
            return batch.tokens.to(self.bundle.device)
        prompts = batch.surrogate_prompts if self.cfg.rollout_from == "surrogate" else batch.target_prompts
        return self.teacher.rollout(prompts, batch.seeds)

    def _guided(self, teach: TeacherTargets, concepts: Sequence[str]) -> torch.Tensor:
        on_t, on_s = teach.on_target, teach.on_surrogate
        if teach.uncond is not None:
            on_t = cfg_combine(on_t, teach.uncond, self.cfg.teacher_cfg_weight)
            on_s = cfg_combine(on_s, teach.uncond, self.cfg.teacher_cfg_weight)
        eta = self._per_row(concepts, "erase_guidance", on_t.device).to(on_t.dtype).view(-1, 1, 1)
        return guided_target(on_t, on_s, eta).detach()

    def _student_out(self, ids, mask, tokens) -> torch.Tensor:
        """The student on c_t, teacher-forced on ``tokens``: last hidden states or image logits."""
        hidden, logits = teacher_forced(self.student, ids, mask, tokens,
                                        return_logits=self.cfg.target_mode == "logit")
        return hidden if self.cfg.target_mode == "hidden" else logits

    def _per_token(self, ids, mask, tokens, target) -> torch.Tensor:
        """Per-token loss [B, len(tokens)] of the student toward ``target`` (plain PyTorch)."""
        out = self._student_out(ids, mask, tokens)
        n = tokens.shape[1]
        if self.cfg.target_mode == "hidden":
            return per_token_mse(out, target[:, :n])
        return per_token_kl(out, target[:, :n])

    def _sequence(self, ids, mask, tokens, target, windows, threshold) -> StepResult:
        # the fused kernel (Triton on GPU) or the reference, by erase.loss_backend
        out = windowed_loss_from_target(self.cfg.target_mode, self._student_out(ids, mask, tokens), target,
                                        windows, threshold, backend=self.cfg.loss_backend)
        loss = out.loss
        # NaN window sums compare False against the threshold and would pass as "masked":
        # finiteness is checked on the per-token losses, not on the (masked) total
        if self.updater.global_any(not bool(torch.isfinite(out.per_token).all())):
            self.updater.zero_grad()
            return StepResult(float(loss.detach()), 0, out.num_windows, 0, tokens.numel(), nonfinite=True)
        steps = 0
        if self.updater.global_any(out.num_kept > 0):  # a rank with no kept window steps with zero grads
            self.updater.backward(loss)
            self.updater.step()
            steps = 1
        return StepResult(float(loss.detach()), out.num_kept, out.num_windows, steps, tokens.numel(),
                          per_concept=_per_concept(self._concepts, out.kept, out.window_exists, out.window_loss))

    def _per_window(self, ids, mask, tokens, target, windows, threshold) -> StepResult:
        total_loss, kept, steps, n_windows = 0.0, 0, 0, 0
        per_concept: dict = {}
        for w in range(self.updater.global_max(int(windows.max()) + 1)):
            in_window = windows == w
            # the student sees only the prefix the window needs (causal model); later
            # windows are computed by the student as updated by the earlier ones. A rank
            # without tokens in this window still runs (one token) so that ranks step together.
            prefix = int(in_window.nonzero()[:, 1].max()) + 1 if bool(in_window.any()) else 1
            per_token = self._per_token(ids, mask, tokens[:, :prefix], target)
            sel = in_window[:, :prefix]
            only_w = torch.where(sel, per_token, torch.zeros_like(per_token))
            out = windowed_masked_loss(only_w, torch.zeros_like(sel, dtype=torch.long), threshold,
                                       scale=1.0 / max(int(sel.sum()), 1))
            rows = int(sel.any(1).sum())
            n_windows += rows
            if self.updater.global_any(not bool(torch.isfinite(per_token[sel]).all())):
                self.updater.zero_grad()
                return StepResult(float("nan"), kept, n_windows, steps, tokens.numel(), nonfinite=True)
            # rows without a token in window w (short per-row windows) are not windows here
            exists = sel.any(1, keepdim=True)
            for c, rec in _per_concept(self._concepts, out.kept & exists, exists, out.window_loss).items():
                acc = per_concept.setdefault(c, [0, 0, 0.0])
                for i in range(3):
                    acc[i] += rec[i]
            row_kept = int((out.kept[:, 0] & sel.any(1)).sum())
            total_loss += float(out.loss.detach())
            if self.updater.global_any(row_kept > 0):
                self.updater.backward(out.loss)
                self.updater.step()
                steps += 1
                kept += row_kept
        return StepResult(total_loss, kept, n_windows, steps, tokens.numel(), per_concept=per_concept)

    def _esd(self, ids, mask, tokens, target) -> StepResult:
        """Naive baseline: a random share of positions, plain mean loss, no windows, no threshold."""
        b, t = tokens.shape
        n_pick = max(1, int(round(self.cfg.esd_patch_fraction * t)))
        pick = torch.stack([torch.randperm(t, generator=self.generator)[:n_pick] for _ in range(b)]).to(tokens.device)
        per_token = self._per_token(ids, mask, tokens, target)
        loss = per_token.gather(1, pick).mean()
        if self.updater.global_any(not bool(torch.isfinite(loss))):
            self.updater.zero_grad()
            return StepResult(float(loss.detach()), 0, 0, 0, tokens.numel(), nonfinite=True)
        self.updater.backward(loss)
        self.updater.step()
        return StepResult(float(loss.detach()), 0, 0, 1, tokens.numel(), extras={"positions": n_pick * b})

    def _svare(self, batch: PairBatch, tokens: torch.Tensor) -> StepResult:
        """S-VARE: filtered CE on c_t toward the surrogate tokens + preservation KL on c_s."""
        cfg = self.cfg
        b = len(batch)
        teach = self.teacher.targets(batch.target_prompts, batch.surrogate_prompts, tokens, "logit")
        ids, mask = self.bundle.encode_prompts(list(batch.target_prompts) + list(batch.surrogate_prompts))
        _, logits = teacher_forced(self.student, ids, mask, torch.cat([tokens, tokens]))
        out = svare_loss(logits[:b], tokens, logits[b:], teach.on_surrogate, cfg.svare_label_prob_max,
                         cfg.svare_preserve_weight)
        if self.updater.global_any(not bool(torch.isfinite(out.loss))):
            self.updater.zero_grad()
            return StepResult(float(out.loss.detach()), 0, 0, 0, tokens.numel(), nonfinite=True)
        self.updater.backward(out.loss)
        self.updater.step()
        return StepResult(float(out.loss.detach()), 0, 0, 1, tokens.numel(),
                          extras={"ce": float(out.ce.detach()), "preserve": float(out.preserve.detach()), "counted": out.num_counted})
