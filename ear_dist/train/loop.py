"""The training loop: steps ``start .. train.steps - 1`` of a built job, with small hooks around it.

The loop itself takes this rank's batch, runs the step and hands the result to each hook
in turn; between steps it asks whether to stop (a preemption signal or SIGINT; all student
ranks agree). The hooks: :class:`NonFiniteGuard` (a non-finite loss skips the step and is
counted; too many, or a non-finite update, stop the run), :class:`Metrics`
(``metrics.jsonl``, TensorBoard, the progress bar or log lines, drift probes) and
:class:`Checkpoints` (every ``train.checkpoint_every`` steps, and when stopping). A
collective that fails because another rank died becomes :class:`RankLostError`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ear_dist.config import Config
from ear_dist.errors import EXIT_NONFINITE, RunFailure
from ear_dist.telemetry.memory import current_rss_bytes
from ear_dist.train import checkpoint
from ear_dist.train.step import StepResult

log = logging.getLogger("ear_dist.train")


class TrainingError(RunFailure, RuntimeError):
    """The run cannot go on; the message says why."""


class NonFiniteError(TrainingError):
    """Too many non-finite losses, or an update that left the trained weights non-finite (exit 3)."""

    exit_code = EXIT_NONFINITE


class RankLostError(RunFailure, RuntimeError):
    """A collective failed: another rank died or stopped answering within ``dist.timeout_s``."""


@dataclass
class StepRecord:
    """One step as the hooks see it."""

    step: int
    result: StepResult
    step_s: float  # data included
    data_wait_s: float  # getting this rank's pairs


@dataclass
class Tally:
    """What the loop counted, for the summary."""

    windows_kept: int = 0
    windows_total: int = 0
    optimizer_steps: int = 0
    image_tokens: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0  # inside the steps, data included
    data_wait_seconds: float = 0.0  # getting this rank's pairs of each step
    rss_start: Optional[int] = None
    rss_end: Optional[int] = None
    last: Optional[StepResult] = None
    stopped_at: Optional[int] = None
    comm_bytes_per_step: Optional[dict] = None

    def add(self, rec: StepRecord) -> None:
        r = self.last = rec.result
        self.image_tokens += r.image_tokens
        self.data_wait_seconds += rec.data_wait_s
        self.step_seconds += rec.step_s
        if r.nonfinite:  # skipped: nothing of it trained
            self.nonfinite += 1
            return
        self.windows_kept += r.windows_kept
        self.windows_total += r.windows_total
        self.optimizer_steps += r.optimizer_steps

    def summary(self, cfg: Config, start: int, missing_concept: int, trainable: int, ranks: int,
                replaced: int) -> dict:
        def gib(n):
            return None if n is None else n / 2**30

        out = {
            "delta": None, "steps": cfg.train.steps, "resumed_from": start,
            "optimizer_steps": self.optimizer_steps, "windows_kept": self.windows_kept,
            "windows_total": self.windows_total, "nonfinite_steps": self.nonfinite, "missing_concept": missing_concept,
            "last_loss": self.last.loss if self.last else None, "seconds": self.seconds,
            "image_tokens_per_s": self.image_tokens / self.seconds if self.seconds > 0 else None,
            "data_wait_seconds": self.data_wait_seconds,
            "data_wait_share": self.data_wait_seconds / self.step_seconds if self.step_seconds > 0 else None,
            "replaced_samples": replaced, "rss_start_gib": gib(self.rss_start), "rss_end_gib": gib(self.rss_end),
            "trainable_parameters": trainable, "student_ranks": ranks,
        }
        if self.comm_bytes_per_step is not None:
            out["comm_bytes_per_step"] = self.comm_bytes_per_step
        return out


class Hook:
    """Sees every step after it ran; ``on_stop`` when the run stops early; ``close`` at the end, always."""

    def after_step(self, rec: StepRecord, tally: Tally) -> None:
        pass

    def on_stop(self, next_step: int) -> None:
        pass

    def close(self) -> None:
        pass


def train_loop(job, start: int, hooks: Sequence[Hook], should_stop: Optional[Callable[[], bool]] = None) -> Tally:
    """Steps ``start .. train.steps - 1``; stops early (``tally.stopped_at``) when ``should_stop`` says so."""
    cfg, rt, updater = job.cfg, job.rt, job.student.updater

    def stop_requested() -> bool:  # every student rank asks, so all stop at the same step
        return updater.global_any(bool(should_stop())) if should_stop is not None else False

    comms = _CommCounter(cfg, job.student)
    tally = Tally(rss_start=current_rss_bytes())
    t0 = time.perf_counter()
    step = start
    try:
        for step in range(start, cfg.train.steps):
            began = time.perf_counter()
            batch = job.stream.next().local(rt.dp_rank, rt.dp_world, rt.device)
            data_wait = time.perf_counter() - began
            result = job.step(batch)
            rec = StepRecord(step, result, time.perf_counter() - began, data_wait)
            tally.add(rec)
            for hook in hooks:
                hook.after_step(rec, tally)
            if stop_requested():
                for hook in hooks:
                    hook.on_stop(step + 1)
                tally.stopped_at = step + 1
                break
    except RuntimeError as e:
        if rt.distributed and not isinstance(e, RunFailure) and _lost_a_rank(e):
            raise RankLostError(
                f"rank {rt.rank}: a collective failed at step {step} ({str(e).splitlines()[0][:200]}): another rank "
                f"died or did not answer within dist.timeout_s={cfg.dist.timeout_s} s. Run the same command again "
                "to resume from the last checkpoint") from e
        raise
    finally:
        for hook in hooks:
            hook.close()
    tally.seconds = time.perf_counter() - t0
    tally.rss_end = current_rss_bytes()
    tally.comm_bytes_per_step = comms.per_step(max(cfg.train.steps - start, 1))
    return tally


def weights_finite(student) -> bool:
    """Whether this rank's trained tensors (its ZeRO-3 partition, else the whole tensors) are all finite."""
    checks = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in student.module.parameters()
              if p.requires_grad]
    return bool(torch.stack(checks).all()) if checks else True


class NonFiniteGuard(Hook):
    """A non-finite loss: the step took no update (the step saw to it); counted, and after
    ``train.max_nonfinite_steps`` the run stops. Non-finite trained weights after a step (an update
    that overflowed, e.g. ``optim.lr`` far too large): the update cannot be undone, so the run stops
    at once, before a checkpoint or delta could keep them."""

    def __init__(self, job):
        self.student, self.cfg = job.student, job.cfg

    def after_step(self, rec: StepRecord, tally: Tally) -> None:
        lr, limit = self.cfg.optim.lr, self.cfg.train.max_nonfinite_steps
        if self.student.updater.global_any(not weights_finite(self.student)):
            raise NonFiniteError(
                f"step {rec.step}: the update made the trained weights non-finite (optim.lr={lr:g}); nothing was "
                "saved from this step on. Lower optim.lr, or check the model's dtype (model.dtype)")
        if not rec.result.nonfinite:
            return
        log.warning("step %d: non-finite loss %s, skipped (%d so far)", rec.step, rec.result.loss, tally.nonfinite)
        if tally.nonfinite >= limit:
            raise NonFiniteError(
                f"{tally.nonfinite} steps with a non-finite loss (train.max_nonfinite_steps={limit}); last at step "
                f"{rec.step}. Lower optim.lr (now {lr:g}) or check the model's dtype (model.dtype)")


class Checkpoints(Hook):
    """A checkpoint every ``train.checkpoint_every`` steps and at an early stop (the run resumes from it)."""

    def __init__(self, job, out_dir: Path, identity):
        self.job, self.out_dir, self.identity = job, out_dir, identity
        self.written: Optional[int] = None

    def after_step(self, rec: StepRecord, tally: Tally) -> None:
        every = self.job.cfg.train.checkpoint_every
        if every and (rec.step + 1) % every == 0:
            self._write(rec.step + 1)

    def on_stop(self, next_step: int) -> None:
        if self.written != next_step:
            self._write(next_step)

    def _write(self, next_step: int) -> None:
        job = self.job
        parts = {"preservation": job.keep.preservation.state_dict()} if job.keep.preservation is not None else {}
        state = {"run_hash": self.identity.hash, "identity": self.identity.keys, "data": job.stream.state_dict()}
        checkpoint.write(self.out_dir, job.rt, job.student, job.generator, next_step, state, parts)
        self.written = next_step


REDUCTIONS = {"windows_*": "sum", "window_loss_sum/*": "sum", "optimizer_steps": "max", "time/*": "max",
              "memory/*": "max", "throughput/*": "sum", "data/*": "sum"}


class Metrics(Hook):
    """``metrics.jsonl`` and TensorBoard every ``train.log_every`` steps (and drift probes every
    ``preserve.probe_every``). With a terminal a progress bar shows the run; without one (a Slurm
    job log), or with ``progress=False``, rank 0 logs a line every ``train.log_every`` steps."""

    def __init__(self, job, out_dir: Path, progress: bool, start: int):
        from ear_dist.telemetry.writer import MetricsWriter

        self.job, cfg, rt = job, job.cfg, job.rt
        self.concepts = job.stream.concepts()
        self.writer = MetricsWriter(out_dir, reductions=REDUCTIONS, tensorboard=cfg.train.tensorboard,
                                    group=rt.student_group)
        self.bar = None
        if progress and rt.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=f"erasing {cfg.erase.concept!r}", unit="step", initial=start, total=cfg.train.steps)

    def after_step(self, rec: StepRecord, tally: Tally) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if rec.result.nonfinite:
            return
        job, step, result = self.job, rec.step, rec.result
        train, probe, probe_every = job.cfg.train, job.keep.probe, job.cfg.preserve.probe_every
        probing = probe is not None and step % probe_every == 0
        if step % train.log_every and not probing:
            return
        scalars = {**_scalars(result, self.concepts), "time/step_s": rec.step_s, "time/data_wait_s": rec.data_wait_s,
                   "throughput/image_tokens_per_s": result.image_tokens / rec.step_s,
                   "memory/rss_gib": (current_rss_bytes() or 0) / 2**30, "data/replaced_samples": job.stream.replaced}
        if probing:
            scalars.update(probe.measure(job.student.module, job.step.bundle))
        reduced = self.writer.write(step, scalars)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{result.loss:.4g}", kept=f"{result.windows_kept}/{result.windows_total}")
        elif job.rt.is_main and step % train.log_every == 0:
            log.info(_progress_line(step, train.steps, reduced))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def _lost_a_rank(error: RuntimeError) -> bool:
    """A torch.distributed failure (gloo reports a dead peer as a plain RuntimeError)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                            "timed out", "NCCL"))


def _progress_line(step: int, steps: int, m: dict) -> str:
    """The log line of a step: what a Slurm job log shows instead of a progress bar."""
    step_s, wait = m.get("time/step_s") or 0.0, m.get("time/data_wait_s") or 0.0
    share = f" ({100 * wait / step_s:.1f}%)" if step_s > 0 else ""
    return (f"step {step + 1}/{steps}: loss {m.get('loss', float('nan')):.4g}, windows kept "
            f"{int(m.get('windows_kept') or 0)}/{int(m.get('windows_total') or 0)}, "
            f"{m.get('throughput/image_tokens_per_s') or 0:,.0f} image tokens/s, step {step_s * 1e3:.0f} ms, "
            f"data wait {wait * 1e3:.1f} ms{share}, RSS {m.get('memory/rss_gib') or 0:.2f} GiB")


def _scalars(result: StepResult, concept_names: list[str]) -> dict:
    scalars = {"loss": result.loss, "windows_kept": result.windows_kept, "windows_total": result.windows_total,
               "optimizer_steps": result.optimizer_steps, **result.extras}
    if len(concept_names) > 1:  # joint run: the same names on every rank (all concepts)
        for c in concept_names:
            k, n, loss = result.per_concept.get(c, (0, 0, 0.0))
            scalars.update({f"windows_kept/{c}": k, f"windows_total/{c}": n, f"window_loss_sum/{c}": loss})
    return scalars


class _CommCounter:
    """DeepSpeed's collective bytes over the run (``dist.log_comms``), leaving out the engine's init broadcast."""

    def __init__(self, cfg: Config, student):
        self.enabled = student.zero_stage is not None and cfg.dist.log_comms
        self.at_start: dict = {}
        if self.enabled:
            from ear_dist.distributed.deepspeed_engine import comm_bytes

            self.at_start = comm_bytes()

    def per_step(self, steps: int) -> Optional[dict]:
        if not self.enabled:
            return None
        from ear_dist.distributed.deepspeed_engine import comm_bytes

        return {op: (b - self.at_start.get(op, 0)) / steps for op, b in comm_bytes().items()}
