"""The erasure job: load, build the parts, loop over steps, write the delta.

The same function runs in one process or on every rank of a launched job
(torchrun, srun, mpirun, deepspeed): ``launch.discover`` finds the rank, the runtime
assigns roles, and the parts are built without the job knowing where the teacher
runs or which ZeRO stage holds the student.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ear_dist.config import Config, ConfigError, save_config
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import PairStream, check_pairs, load_training_pairs
from ear_dist.models.delta import save_delta
from ear_dist.models.family import load_model
from ear_dist.models.janus import model_fingerprint
from ear_dist.teacher.base import TeacherSettings, build_teacher
from ear_dist.train import checkpoint
from ear_dist.train.preserve import build_preserving_parts
from ear_dist.train.step import ErasureStep, StepResult
from ear_dist.train.student import build_student
from ear_dist.train.trainable import select_trainable_names

log = logging.getLogger("ear_dist.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses); the message says why."""


def run_erase(cfg: Config, pairs: Optional[Sequence[PromptPair]] = None, progress: bool = True,
              should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Train the student to erase the pairs' concepts; write the delta; return a summary.

    ``should_stop`` is polled after every step (preemption): when it returns True the run
    writes a checkpoint and returns with ``"stopped": True``; the next run with the same
    ``train.out_dir`` resumes from it.
    """
    from ear_dist.distributed.runtime import init_runtime

    cfg.validate()
    rt = init_runtime(cfg)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    bundle = load_model(cfg.model.path, cfg.model.family, device=rt.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    pairs = list(pairs) if pairs is not None else load_training_pairs(cfg)
    check = _check_inputs(cfg, rt, bundle, pairs)
    stream = PairStream(pairs, cfg.train.pairs_per_step, cfg.train.seed, cfg.data.shuffle)
    state = checkpoint.read_state(out_dir)
    start = int(state["step"]) if state is not None else 0
    stream.skip(start)  # the batch stream is deterministic: a resumed run skips what was trained
    base_fingerprint = model_fingerprint(bundle.model)

    settings = TeacherSettings.from_config(cfg.erase, cfg.rollout)
    teacher = build_teacher(cfg, rt, bundle, settings, steps=cfg.train.steps - start)
    if rt.role == "teacher":
        return {**teacher.serve(stream, start), "rank": rt.rank}
    trainable = select_trainable_names(bundle.model, cfg.trainable)
    keep = build_preserving_parts(cfg, rt, bundle, trainable)  # from the base model, before any update
    student = build_student(cfg, rt, bundle, trainable, share_frozen=teacher.shares_model, edits=keep.edits)
    _announce(cfg, rt, bundle, student, keep)
    generator = torch.Generator().manual_seed(cfg.train.seed + rt.dp_rank)
    if state is not None:
        _, parts = checkpoint.restore(out_dir, student, generator)
        if keep.preservation is not None and "preservation" in parts:
            keep.preservation.load_state_dict(parts["preservation"])
        if rt.is_main:
            print(f"resuming from {out_dir / checkpoint.CKPT} at step {start}")
    step_fn = ErasureStep(student.module, bundle, teacher, cfg.erase, student.updater, generator, settings,
                          preservation=keep.preservation)

    tally = _train_loop(cfg, rt, stream, step_fn, student, generator, start, progress, should_stop, keep)
    if tally.stopped_at is not None:
        return {"stopped": True, "step": tally.stopped_at, "checkpoint": str(out_dir / checkpoint.CKPT)}
    trained = student.trained_state()  # collective under ZeRO-3
    delta = None
    if rt.is_main:
        concepts = stream.concepts() or [cfg.erase.concept]
        delta = save_delta(out_dir / "delta.safetensors", trained, base_fingerprint, cfg.model.path, concepts,
                           cfg.to_dict())
    summary = tally.summary(cfg, start, delta, len(check.missing_concept), student.num_trainable, rt.dp_world)
    if rt.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_inputs(cfg: Config, rt, bundle, pairs):
    """Settings that only the model and the launch can validate, then the pairs themselves."""
    if cfg.erase.window_len > bundle.num_image_tokens:
        raise ConfigError(f"erase.window_len: {cfg.erase.window_len} > the model's {bundle.num_image_tokens} "
                          "image tokens")
    if cfg.train.pairs_per_step % rt.dp_world:
        raise ConfigError(f"train.pairs_per_step: {cfg.train.pairs_per_step} is not divisible by the "
                          f"{rt.dp_world} student ranks")
    return check_pairs(pairs, cfg.erase.on_missing_concept, bundle.num_image_tokens)


def _announce(cfg: Config, rt, bundle, student, keep) -> None:
    if not rt.is_main:
        return
    n_total = sum(p.numel() for p in bundle.model.parameters())
    stage = student.zero_stage if student.zero_stage is not None else "off"
    print(f"trainable parameters: {student.num_trainable:,} in {len(student.trainable)} tensors "
          f"({100 * student.num_trainable / n_total:.2f}% of {n_total:,}); student ranks {rt.dp_world}, "
          f"teacher {cfg.dist.teacher_placement}, ZeRO {stage}")
    if keep.nullspace_ranks:
        spans = sorted(set(keep.nullspace_ranks.values()))
        print(f"null-space updates: {len(keep.nullspace_ranks)} layers, preserved input span of rank {spans} "
              f"({100 * cfg.preserve.nullspace_energy:g}% of the anchors' input energy)")


@dataclass
class Tally:
    """What the loop counted, for the summary."""

    windows_kept: int = 0
    windows_total: int = 0
    optimizer_steps: int = 0
    image_tokens: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    last: Optional[StepResult] = None
    stopped_at: Optional[int] = None
    comm_bytes_per_step: Optional[dict] = None

    def add(self, result: StepResult) -> None:
        self.windows_kept += result.windows_kept
        self.windows_total += result.windows_total
        self.optimizer_steps += result.optimizer_steps

    def summary(self, cfg: Config, start: int, delta, missing_concept: int, trainable: int, ranks: int) -> dict:
        out = {
            "delta": str(delta) if delta else None, "steps": cfg.train.steps, "resumed_from": start,
            "optimizer_steps": self.optimizer_steps, "windows_kept": self.windows_kept,
            "windows_total": self.windows_total, "nonfinite_steps": self.nonfinite, "missing_concept": missing_concept,
            "last_loss": self.last.loss if self.last else None, "seconds": self.seconds,
            "image_tokens_per_s": self.image_tokens / self.seconds if self.seconds > 0 else None,
            "trainable_parameters": trainable, "student_ranks": ranks,
        }
        if self.comm_bytes_per_step is not None:
            out["comm_bytes_per_step"] = self.comm_bytes_per_step
        return out


def _train_loop(cfg: Config, rt, stream: PairStream, step_fn: ErasureStep, student, generator, start: int,
                progress: bool, should_stop, keep) -> Tally:
    """Steps ``start .. train.steps - 1``: train, log, checkpoint, stop on request."""
    from ear_dist.telemetry.writer import MetricsWriter

    out_dir = Path(cfg.train.out_dir)
    concept_names = stream.concepts()
    metrics = MetricsWriter(out_dir, reductions={"windows_*": "sum", "window_loss_sum/*": "sum",
                                                 "optimizer_steps": "max"},
                            tensorboard=cfg.train.tensorboard, group=rt.student_group)
    comms = _CommCounter(cfg, student)
    steps = range(start, cfg.train.steps)
    if progress and rt.is_main:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"erasing {cfg.erase.concept!r}", unit="step", initial=start, total=cfg.train.steps)
    tally = Tally()
    t0 = time.perf_counter()
    try:
        for step in steps:
            batch = stream.next().local(rt.dp_rank, rt.dp_world, rt.device)
            result = tally.last = step_fn(batch)
            tally.image_tokens += result.image_tokens
            if result.nonfinite:
                tally.nonfinite += 1
                log.warning("step %d: non-finite loss %s, skipped (%d so far)", step, result.loss, tally.nonfinite)
                if tally.nonfinite >= cfg.train.max_nonfinite_steps:
                    raise TrainingError(
                        f"{tally.nonfinite} steps with a non-finite loss (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}); last at step {step}. Lower optim.lr or check the model "
                        "dtype.")
                continue
            tally.add(result)
            if step % cfg.train.log_every == 0 or (keep.probe is not None and step % cfg.preserve.probe_every == 0):
                scalars = _scalars(result, concept_names)
                if keep.probe is not None and step % cfg.preserve.probe_every == 0:
                    scalars.update(keep.probe.measure(student.module, step_fn.bundle))
                metrics.write(step, scalars)
                if progress and rt.is_main:
                    steps.set_postfix(loss=f"{result.loss:.4g}", kept=f"{result.windows_kept}/{result.windows_total}")
            every = cfg.train.checkpoint_every
            stop_now = student.updater.global_any(bool(should_stop())) if should_stop is not None else False
            if (every and (step + 1) % every == 0) or stop_now:
                parts = {"preservation": keep.preservation.state_dict()} if keep.preservation is not None else {}
                checkpoint.write(out_dir, rt, student, generator, step + 1, parts)
            if stop_now:
                tally.stopped_at = step + 1
                break
    finally:
        metrics.close()
    tally.seconds = time.perf_counter() - t0
    tally.comm_bytes_per_step = comms.per_step(max(cfg.train.steps - start, 1))
    return tally


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
