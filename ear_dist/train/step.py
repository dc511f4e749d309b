"""One erasure step per batch of prompt pairs: teacher -> student -> loss -> windows -> mask -> update.

EAR (the default): the teacher answers one :class:`TeacherRequest` with image tokens
(sampled from the surrogate prompt unless the pair brings its own, or from the target
prompt with ``erase.rollout_from=target``) and its raw teacher-forced outputs on both
prompts. The student is teacher-forced on c_t over all positions at once. The loss
(``ear_dist.train.step_loss``) builds the guided target
``M*(c_s) - eta * (M*(c_t) - M*(c_s))`` from those raw outputs (``hidden``: last hidden
state, MSE; ``logit``: generation-head logits, KL), sums per-token losses over windows
of ``window_len`` tokens (WGA), and windows whose sum is under ``loss_threshold`` carry
no gradient (TLM). With the Triton backend the target only ever exists in registers.

Update modes: ``window`` steps the optimizer after every kept window, in order, each
window's loss computed by the student as updated by the windows before it (the
paper); ``sequence`` takes all kept windows of the batch in one step. In ``window``
mode, ``erase.window_prefix`` says how a window sees the tokens before it: ``recompute``
re-runs the updated student over the whole prefix, ``cached`` reads the keys/values the
student computed when it got there (``ear_dist.train.prefix_cache``).

Loss scale: ``sequence`` divides the kept window sums by the number of supervised
tokens (B*T); ``window`` divides one window's sum by its token count (B*len).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ear_dist.config import ConfigError, EraseConfig, RolloutConfig
from ear_dist.data.stream import PairBatch
from ear_dist.losses.svare import bitwise_svare_loss, code_distance_filter, svare_loss
from ear_dist.losses.windowed_reference import guidance_combine, scale_window_index, window_index
from ear_dist.models.family import as_image_model
from ear_dist.models.interface import ImageModel
from ear_dist.teacher.base import Teacher, TeacherOutputs, TeacherRequest, TeacherSettings
from ear_dist.train.step_loss import windowed_loss
from ear_dist.train.prefix_cache import PrefixCache
from ear_dist.train.preserve import Preservation
from ear_dist.train.updater import Updater

__all__ = ["ErasureStep", "PairBatch", "StepResult", "Updater"]


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


@dataclass
class RowSettings:
    """Per-row erasure settings of a batch (joint runs mix concepts with their own overrides)."""

    window_len: torch.Tensor  # [B] long
    loss_threshold: torch.Tensor  # [B] float
    erase_guidance: torch.Tensor  # [B] float

    @classmethod
    def of(cls, cfg: EraseConfig, concepts: Sequence[str], device) -> "RowSettings":
        def per_row(name: str, dtype) -> torch.Tensor:
            values = []
            for c in concepts:
                override = cfg.concepts.get(c)
                v = getattr(override, name) if override is not None else None
                values.append(getattr(cfg, name) if v is None else v)
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(per_row("window_len", torch.long), per_row("loss_threshold", torch.float32),
                   per_row("erase_guidance", torch.float32))


class ErasureStep:
    """Callable ``step(batch) -> StepResult`` binding a student, a teacher and an updater.

    ``settings`` (what the teacher computes) defaults to the one derived from ``cfg`` and
    the default rollout settings; the trainer passes the run's.
    """

    def __init__(self, student: torch.nn.Module, bundle: ImageModel, teacher: Teacher, cfg: EraseConfig,
                 updater: Updater, generator: Optional[torch.Generator] = None,
                 settings: Optional[TeacherSettings] = None, preservation: Optional[Preservation] = None):
        self.student, self.teacher, self.cfg, self.updater = student, teacher, cfg, updater
        self.bundle = as_image_model(bundle)
        self.settings = settings if settings is not None else TeacherSettings.from_config(cfg, RolloutConfig())
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.preservation = preservation
        self._anchors: Optional[list[int]] = None

    # ----------------------------------------------------------------- the step
    def __call__(self, batch: PairBatch) -> StepResult:
        teach = self.teacher.outputs(TeacherRequest.from_batch(self.settings, batch))
        if self.preservation is not None:  # this step's anchors, drawn by their drift
            self.preservation.maybe_refresh(self.student, self.bundle)
            self._anchors = self.preservation.draw()
        if self.cfg.method == "svare":
            return self._svare(batch, teach)
        ids, mask = self.bundle.encode_prompts(batch.target_prompts)
        rows = RowSettings.of(self.cfg, batch.concepts, teach.tokens.device)
        if self.cfg.method == "esd":
            return self._esd(ids, mask, teach, rows)
        windows = self._windows(teach.tokens, rows)
        if self.cfg.update_mode == "sequence":
            return self._sequence(ids, mask, teach, windows, rows, batch.concepts)
        return self._per_window(ids, mask, teach, windows, rows, batch.concepts)

    # ----------------------------------------------------------------- parts
    def _windows(self, tokens: torch.Tensor, rows: "RowSettings") -> torch.Tensor:
        """Window ids [B, T]: runs of ``window_len`` tokens, or on a next-scale model runs of
        ``window_scales`` whole scales (a scale is predicted in one step, so it is never split)."""
        b, t = tokens.shape
        scales = self.bundle.scale_sizes
        if scales is not None:
            return scale_window_index(b, scales, self.cfg.window_scales, self.cfg.window_order,
                                      generator=self.generator, device=tokens.device)
        if bool((rows.window_len > t).any()):
            raise ConfigError(f"erase.window_len: {int(rows.window_len.max())} > the {t} image tokens per image")
        return window_index(b, t, rows.window_len, self.cfg.window_order, generator=self.generator,
                            device=tokens.device)

    def _student_out(self, ids, mask, tokens) -> torch.Tensor:
        """The student on c_t, teacher-forced on ``tokens``: last hidden states or image logits.

        With teacher-side guidance the target is CFG-sharpened, so the student's conditional
        and unconditional logits are combined the same way: comparing a guided target with
        an unguided student would apply guidance twice at sampling time.
        """
        s = self.settings
        if s.with_uncond:
            b = ids.shape[0]
            rows = torch.cat([ids, self.bundle.unconditional(ids)])
            _, logits = self.bundle.teacher_forced(self.student, rows, mask.repeat(2, 1), tokens.repeat(2, 1))
            return guidance_combine(logits[:b], logits[b:], s.target_guidance_weight)
        logits_wanted = s.mode == "logit"
        hidden, logits = self.bundle.teacher_forced(self.student, ids, mask, tokens, return_logits=logits_wanted)
        return logits if logits_wanted else hidden

    def _loss(self, ids, mask, teach: TeacherOutputs, windows, threshold, eta, scale=None, start=0, cache=None):
        """The windowed loss of the student on tokens ``start .. start + windows.shape[1] - 1``: a causal
        prefix (``start`` 0), or with a ``cache`` of the tokens before ``start``."""
        n = start + windows.shape[1]
        student = self._student_out(ids, mask, teach.tokens[:, :n]) if cache is None else cache.outputs(start, n)
        uncond = teach.uncond[:, start:n] if teach.uncond is not None else None
        return windowed_loss(self.settings.mode, student, teach.on_target[:, start:n], teach.on_surrogate[:, start:n],
                             windows, threshold, eta, uncond=uncond,
                             guidance_weight=self.settings.target_guidance_weight, scale=scale,
                             backend=self.cfg.loss_backend, logit_groups=self.bundle.logit_groups)

    def _apply(self, loss: torch.Tensor, counted: torch.Tensor, any_kept: Optional[bool] = None,
               extras: Optional[dict] = None) -> Optional[int]:
        """Check finiteness, add the preservation term, backward, step: the one place a loss reaches the optimizer.

        Returns None if a rank saw a non-finite loss (the step is skipped), else the number
        of optimizer steps taken. Ranks agree on every decision (all-reduce), so their
        collectives stay in step; a rank with no kept window steps with zero gradients.
        Finiteness is checked on the per-token losses ``counted``: NaN window sums compare
        False against the threshold and would otherwise pass as "masked". With preservation
        anchors, every update that happens also carries their KL.
        """
        if self.updater.global_any(not bool(torch.isfinite(counted).all())):
            self.updater.zero_grad()
            return None
        if any_kept is not None and not self.updater.global_any(any_kept):
            return 0
        if self.preservation is not None:
            term, stats = self.preservation.loss(self.student, self.bundle, self._anchors)
            if self.updater.global_any(not bool(torch.isfinite(term.detach()).all())):
                self.updater.zero_grad()
                return None
            loss = loss + term
            if extras is not None:
                for k, v in stats.items():
                    extras[k] = extras.get(k, 0.0) + v
        self.updater.backward(loss)
        self.updater.step()
        return 1

    def _sequence(self, ids, mask, teach, windows, rows, concepts) -> StepResult:
        out = self._loss(ids, mask, teach, windows, rows.loss_threshold, rows.erase_guidance)
        extras: dict = {}
        steps = self._apply(out.loss, out.per_token, any_kept=out.num_kept > 0, extras=extras)
        if steps is None:
            return StepResult(float(out.loss.detach()), 0, out.num_windows, 0, teach.tokens.numel(), nonfinite=True)
        return StepResult(float(out.loss.detach()), out.num_kept, out.num_windows, steps, teach.tokens.numel(),
                          extras=extras,
                          per_concept=_per_concept(concepts, out.kept, out.window_exists, out.window_loss))

    def _per_window(self, ids, mask, teach, windows, rows, concepts) -> StepResult:
        total_loss, kept, steps, n_windows = 0.0, 0, 0, 0
        per_concept, extras = {}, {}
        cache = PrefixCache(self.student, ids, mask, teach.tokens, self.settings.mode == "logit") \
            if self.cfg.window_prefix == "cached" else None
        for w in range(self.updater.global_max(int(windows.max()) + 1)):
            in_window = windows == w
            # the student sees only the prefix the window needs (causal model); later
            # windows are computed by the student as updated by the earlier ones. A rank
            # without tokens in this window still runs (one token) so that ranks step together.
            positions = in_window.nonzero()[:, 1]
            prefix = int(positions.max()) + 1 if len(positions) else 1
            start = cache.span_start(int(positions.min())) if cache is not None and len(positions) else 0
            sel = in_window[:, start:prefix]
            only_w = torch.where(sel, torch.zeros_like(sel, dtype=torch.long), torch.full_like(sel, -1, dtype=torch.long))
            out = self._loss(ids, mask, teach, only_w, rows.loss_threshold, rows.erase_guidance,
                             scale=1.0 / max(int(sel.sum()), 1), start=start, cache=cache if len(positions) else None)
            n_windows += int(sel.any(1).sum())
            for c, rec in _per_concept(concepts, out.kept, out.window_exists, out.window_loss).items():
                acc = per_concept.setdefault(c, [0, 0, 0.0])
                for i in range(3):
                    acc[i] += rec[i]
            row_kept = int(out.kept.sum())
            total_loss += float(out.loss.detach())
            took = self._apply(out.loss, out.per_token[sel], any_kept=row_kept > 0, extras=extras)
            if took is None:
                return StepResult(float("nan"), kept, n_windows, steps, teach.tokens.numel(), nonfinite=True)
            steps += took
            kept += row_kept if took else 0
        extras = {k: v / max(steps, 1) for k, v in extras.items()}  # mean over the window updates
        return StepResult(total_loss, kept, n_windows, steps, teach.tokens.numel(), extras=extras,
                          per_concept=per_concept)

    def _esd(self, ids, mask, teach, rows) -> StepResult:
        """Naive baseline: a random share of positions, plain mean loss, no windows, no threshold."""
        b, t = teach.tokens.shape
        n_pick = max(1, int(round(self.cfg.esd_patch_fraction * t)))
        pick = torch.stack([torch.randperm(t, generator=self.generator)[:n_pick] for _ in range(b)])
        chosen = torch.full((b, t), -1, dtype=torch.long).scatter_(1, pick, 0).to(teach.tokens.device)
        out = self._loss(ids, mask, teach, chosen, float("-inf"), rows.erase_guidance, scale=1.0 / (n_pick * b))
        extras: dict = {"positions": n_pick * b}
        took = self._apply(out.loss, out.per_token[chosen >= 0], extras=extras)
        loss = float(out.loss.detach())
        if took is None:
            return StepResult(loss, 0, 0, 0, teach.tokens.numel(), nonfinite=True)
        return StepResult(loss, 0, 0, took, teach.tokens.numel(), extras=extras)

    def _svare(self, batch: PairBatch, teach: TeacherOutputs) -> StepResult:
        """S-VARE: filtered CE on c_t toward the rollout tokens + preservation KL on c_s.

        On a bitwise model the filter is the paper's (a quarter of the bits wrong) and the
        supervised tokens are those of the first ``erase.svare_scales`` scales (0: all).
        """
        b = len(batch)
        bitwise = self.bundle.logit_groups > 1
        rule = self.cfg.svare_filter if self.cfg.svare_filter != "auto" else ("bits" if bitwise else "prob")
        if (rule == "bits") != bitwise:
            raise ValueError(f"erase.svare_filter: {rule!r} does not apply to a {self.bundle.family} model "
                             f"({'bits or auto' if bitwise else 'prob, code_distance or auto'})")
        tokens, reference = teach.tokens, teach.on_surrogate
        if bitwise and self.cfg.svare_scales:
            n = sum(self.bundle.scale_sizes[: self.cfg.svare_scales])
            tokens, reference = tokens[:, :n], reference[:, :n]
        ids, mask = self.bundle.encode_prompts(list(batch.target_prompts) + list(batch.surrogate_prompts))
        _, logits = self.bundle.teacher_forced(self.student, ids, mask, torch.cat([tokens, tokens]))
        if bitwise:
            from ear_dist.models.var.bsq import token_bits

            out = bitwise_svare_loss(logits[:b], token_bits(tokens, self.bundle.logit_groups), logits[b:], reference,
                                     self.cfg.svare_bit_error_share, self.cfg.svare_preserve_weight)
        else:
            unsafe = None
            if rule == "code_distance":
                codebook = self.bundle.model.model.vqmodel.quantize.embedding.weight
                unsafe = code_distance_filter(logits[:b], tokens, codebook, self.cfg.svare_code_distance)
            out = svare_loss(logits[:b], tokens, logits[b:], reference, self.cfg.svare_label_prob_max,
                             self.cfg.svare_preserve_weight, unsafe=unsafe)
        extras = {"ce": float(out.ce.detach()), "preserve": float(out.preserve.detach()), "counted": out.num_counted,
                  "counted_share": out.num_counted / max(tokens.numel(), 1)}
        took = self._apply(out.loss, out.loss.detach().reshape(1), extras=extras)
        loss = float(out.loss.detach())
        if took is None:
            return StepResult(loss, 0, 0, 0, teach.tokens.numel(), nonfinite=True)
        return StepResult(loss, 0, 0, took, teach.tokens.numel(), extras=extras)
