"""The erasure job: load, build the parts, loop over steps, write the delta.

The same function runs in one process or on every rank of a launched job
(torchrun, srun, mpirun, deepspeed): ``ear_dist.launch.discover`` finds the rank, the runtime
assigns roles, and the parts are built without the job knowing where the teacher
runs or which ZeRO stage holds the student. Before anything is trained the run
decides what to do with its ``train.out_dir`` (``run_state``: resume, refuse, or start
over), and the pairs stream (``data.stream``: shards are read as they are needed).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ear_dist.config import Config, ConfigError, config_yaml
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import PairStream, check_source, load_training_pairs, open_pair_stream, source_digest
from ear_dist.errors import RunFailure
from ear_dist.models.delta import save_delta
from ear_dist.models.family import load_model
from ear_dist.models.fingerprint import model_fingerprint
from ear_dist.storage import write_text_atomic
from ear_dist.teacher.base import TeacherSettings, build_teacher
from ear_dist.telemetry.memory import current_rss_bytes
from ear_dist.train import checkpoint, run_state
from ear_dist.train.adapters import linear_weights
from ear_dist.train.preserve import build_preserving_parts
from ear_dist.train.step import ErasureStep, StepResult
from ear_dist.train.student import build_student
from ear_dist.train.trainable import select_trainable_names

log = logging.getLogger("ear_dist.train")


class TrainingError(RunFailure, RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses); the message says why."""


class RankLostError(RunFailure, RuntimeError):
    """A collective failed: another rank died or stopped answering within ``dist.timeout_s``."""


def run_erase(cfg: Config, pairs: Optional[Sequence[PromptPair]] = None, progress: bool = True,
              should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Train the student to erase the pairs' concepts; write the delta; return a summary.

    ``pairs``: train on these instead of ``data.pairs``. ``should_stop`` is polled after
    every step (preemption): when it returns True the run writes a checkpoint and returns
    with ``"stopped": True``; the next run with the same ``train.out_dir`` resumes from it.
    A run whose identical twin already finished in ``train.out_dir`` returns that run's
    summary with ``"already_finished": True`` and trains nothing.
    """
    from ear_dist.distributed.runtime import init_runtime

    cfg.validate()
    if pairs is None:
        check_source(cfg)  # before minutes of model loading
    rt = init_runtime(cfg)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    bundle = load_model(cfg.model.path, cfg.model.family, device=rt.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    _check_settings(cfg, rt, bundle)
    stream, check = open_pair_stream(cfg, pairs, rt.dp_world, rt.data_slices(), bundle.num_image_tokens,
                                     bundle.codebook_size)
    base_fingerprint = model_fingerprint(bundle.model)
    identity = run_state.run_identity(cfg, base_fingerprint, source_digest(cfg, pairs), _deepspeed_settings(cfg, rt),
                                      rt.dp_world)
    resume = _decide_resume(cfg, rt, out_dir, identity)
    if resume.finished is not None:
        stream.close()
        log.warning("%s: this run already finished at step %s with the same settings (its delta: %s); nothing to "
                    "do. Raise train.steps to extend it, or train.resume=never to train it again", out_dir,
                    resume.step, resume.finished.get("delta"), extra={"shared": True})
        return {**resume.finished, "already_finished": True}
    start = resume.step
    if resume.checkpoint is not None:
        stream.load_state_dict(resume.checkpoint["data"])  # continue with the sample after the last trained

    settings = TeacherSettings.from_config(cfg.erase, cfg.rollout)
    teacher = build_teacher(cfg, rt, bundle, settings, steps=cfg.train.steps - start)
    if rt.role == "teacher":
        try:
            return {**teacher.serve(stream, start), "rank": rt.rank}
        finally:
            stream.close()
    trainable = select_trainable_names(bundle.model, cfg.trainable)
    if cfg.preserve.nullspace:
        trainable = _projectable(bundle.model, trainable, rt.is_main)
    # anchors from the pairs' surrogates: every rank holds all pairs (in memory, or a shard directory read whole
    # once more), so every rank holds the same anchors
    surrogate_source = () if not cfg.preserve.surrogates else stream.pairs if isinstance(stream, PairStream) \
        else load_training_pairs(cfg)
    keep = build_preserving_parts(cfg, rt, bundle, trainable, surrogate_source)  # from the base model, before updates
    student = build_student(cfg, rt, bundle, trainable, share_frozen=teacher.shares_model, edits=keep.edits)
    _announce(cfg, rt, bundle, student, keep)
    generator = torch.Generator().manual_seed(cfg.train.seed + rt.dp_rank)
    if resume.checkpoint is not None:
        _, parts = checkpoint.restore(out_dir, rt, student, generator)
        if keep.preservation is not None and "preservation" in parts:
            keep.preservation.load_state_dict(parts["preservation"])
        log.info("resuming from %s at step %d", checkpoint.latest(out_dir), start, extra={"shared": True})
    step_fn = ErasureStep(student.module, bundle, teacher, cfg.erase, student.updater, generator, settings,
                          preservation=keep.preservation)

    try:
        tally = _train_loop(cfg, rt, stream, step_fn, student, generator, start, progress, should_stop, keep,
                            identity)
    finally:
        stream.close()
    if tally.stopped_at is not None:
        return {"stopped": True, "step": tally.stopped_at, "checkpoint": str(checkpoint.latest(out_dir))}
    trained = student.trained_state()  # collective under ZeRO-3
    delta = None
    summary = tally.summary(cfg, start, None, len(check.missing_concept), student.num_trainable, rt.dp_world,
                            stream.replaced)
    if rt.is_main:
        concepts = stream.concepts() or [cfg.erase.concept]
        provenance = {"run_hash": identity.hash, "identity": identity.keys, "trained_steps": cfg.train.steps,
                      "segments": resume.segments}
        delta = save_delta(out_dir / "delta.safetensors", trained, base_fingerprint, cfg.model.path, concepts,
                           cfg.to_dict(), provenance)
        summary["delta"] = str(delta)
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
        run_state.write_record(out_dir, identity, cfg.train.steps, resume.segments, finished_step=cfg.train.steps)
    return summary


def _check_settings(cfg: Config, rt, bundle) -> None:
    """Settings that only the model and the launch can validate."""
    if bundle.scale_sizes is None and cfg.erase.window_len > bundle.num_image_tokens:  # next-scale: window_scales
        raise ConfigError(f"erase.window_len: {cfg.erase.window_len} > the model's {bundle.num_image_tokens} "
                          "image tokens")
    if cfg.train.pairs_per_step % rt.dp_world:
        raise ConfigError(f"train.pairs_per_step: {cfg.train.pairs_per_step} is not divisible by the "
                          f"{rt.dp_world} student ranks")


def _deepspeed_settings(cfg: Config, rt) -> Optional[dict]:
    if cfg.dist.deepspeed_config == "none":
        return None
    from ear_dist.distributed.deepspeed_engine import load_ds_config

    return load_ds_config(cfg, cfg.train.pairs_per_step // rt.dp_world, torch.float32)


def _decide_resume(cfg: Config, rt, out_dir: Path, identity) -> "run_state.Resume":
    """Every rank reads ``out_dir`` and decides alike; then the main rank clears and records (``run_state``)."""
    resume = run_state.decide(out_dir, cfg.train.resume, identity, cfg.train.steps)
    _barrier(rt)  # everyone has read the directory before the main rank changes it
    if rt.is_main and resume.finished is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_state.prepare(out_dir, resume, identity, cfg.train.steps)
        write_text_atomic(out_dir / "config.yaml", config_yaml(cfg))
    _barrier(rt)
    return resume


def _barrier(rt) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def _projectable(model: torch.nn.Module, trainable: list[str], announce: bool) -> list[str]:
    """The linear weights among ``trainable``: what a null-space run trains.

    A projector constrains a linear weight's update on the preserved inputs; a bias, a norm weight
    or a free scale or bias parameter (the VAR blocks' ``q_bias``, ``v_bias``, ``scale_mul_1H11``)
    has no input to project against, and training it would move the outputs there anyway.
    """
    linear = linear_weights(model, trainable)
    dropped = [n for n in trainable if n not in set(linear)]
    if not linear:
        raise ConfigError(f"preserve.nullspace: none of the {len(trainable)} selected tensors is a linear layer's "
                          f"weight (e.g. {trainable[:3]}); select linear weights with trainable.modules or "
                          "trainable.patterns")
    if dropped and announce:
        log.warning("preserve.nullspace: %d selected tensors are not linear weights and stay frozen, since their "
                    "updates cannot be projected off the anchors' inputs: %s", len(dropped),
                    ", ".join(dropped[:6]) + (" ..." if len(dropped) > 6 else ""))
    return linear


def _announce(cfg: Config, rt, bundle, student, keep) -> None:
    if not rt.is_main:
        return
    n_total = sum(p.numel() for p in bundle.model.parameters())
    stage = student.zero_stage if student.zero_stage is not None else "off"
    log.info("trainable parameters: %s in %d tensors (%.2f%% of %s); student ranks %d, teacher %s, ZeRO %s",
             f"{student.num_trainable:,}", len(student.trainable), 100 * student.num_trainable / n_total,
             f"{n_total:,}", rt.dp_world, cfg.dist.teacher_placement, stage)
    if keep.anchors:
        log.info("anchors: %d prompts (%d of them the training pairs' surrogates, preserve.surrogates=%d)",
                 keep.anchors, keep.surrogate_anchors, cfg.preserve.surrogates)
    if keep.nullspace_ranks:
        spans = sorted(set(keep.nullspace_ranks.values()))
        log.info("null-space updates: %d layers, preserved input span of rank %s (%g%% of the anchors' input "
                 "energy)", len(keep.nullspace_ranks), spans, 100 * cfg.preserve.nullspace_energy)


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

    def add(self, result: StepResult) -> None:
        self.windows_kept += result.windows_kept
        self.windows_total += result.windows_total
        self.optimizer_steps += result.optimizer_steps

    def summary(self, cfg: Config, start: int, delta, missing_concept: int, trainable: int, ranks: int,
                replaced: int) -> dict:
        def gib(n):
            return None if n is None else n / 2**30

        out = {
            "delta": str(delta) if delta else None, "steps": cfg.train.steps, "resumed_from": start,
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


REDUCTIONS = {"windows_*": "sum", "window_loss_sum/*": "sum", "optimizer_steps": "max", "time/*": "max",
              "memory/*": "max", "throughput/*": "sum", "data/*": "sum"}


def _train_loop(cfg: Config, rt, stream, step_fn: ErasureStep, student, generator, start: int,
                progress: bool, should_stop, keep, identity) -> Tally:
    """Steps ``start .. train.steps - 1``: train, log, checkpoint, stop on request.

    With a terminal a progress bar shows the run; without one (a Slurm job log), or with
    ``progress=False``, rank 0 logs a line every ``train.log_every`` steps.
    """
    from ear_dist.telemetry.writer import MetricsWriter

    out_dir = Path(cfg.train.out_dir)
    concept_names = stream.concepts()
    metrics = MetricsWriter(out_dir, reductions=REDUCTIONS, tensorboard=cfg.train.tensorboard, group=rt.student_group)
    comms = _CommCounter(cfg, student)
    steps = range(start, cfg.train.steps)
    bar = progress and rt.is_main and sys.stderr.isatty()
    if bar:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"erasing {cfg.erase.concept!r}", unit="step", initial=start, total=cfg.train.steps)
    tally = Tally(rss_start=current_rss_bytes())
    t0 = time.perf_counter()
    step = start
    try:
        for step in steps:
            began = time.perf_counter()
            batch = stream.next().local(rt.dp_rank, rt.dp_world, rt.device)
            data_wait = time.perf_counter() - began
            result = tally.last = step_fn(batch)
            step_s = time.perf_counter() - began
            tally.image_tokens += result.image_tokens
            tally.data_wait_seconds += data_wait
            tally.step_seconds += step_s
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
                scalars = {**_scalars(result, concept_names), "time/step_s": step_s, "time/data_wait_s": data_wait,
                           "throughput/image_tokens_per_s": result.image_tokens / step_s,
                           "memory/rss_gib": (current_rss_bytes() or 0) / 2**30, "data/replaced_samples": stream.replaced}
                if keep.probe is not None and step % cfg.preserve.probe_every == 0:
                    scalars.update(keep.probe.measure(student.module, step_fn.bundle))
                reduced = metrics.write(step, scalars)
                if bar:
                    steps.set_postfix(loss=f"{result.loss:.4g}", kept=f"{result.windows_kept}/{result.windows_total}")
                elif rt.is_main and step % cfg.train.log_every == 0:
                    log.info(_progress_line(step, cfg.train.steps, reduced))
            every = cfg.train.checkpoint_every
            stop_now = student.updater.global_any(bool(should_stop())) if should_stop is not None else False
            if (every and (step + 1) % every == 0) or stop_now:
                parts = {"preservation": keep.preservation.state_dict()} if keep.preservation is not None else {}
                state = {"run_hash": identity.hash, "identity": identity.keys, "data": stream.state_dict()}
                checkpoint.write(out_dir, rt, student, generator, step + 1, state, parts)
            if stop_now:
                tally.stopped_at = step + 1
                break
    except RuntimeError as e:
        if rt.distributed and _lost_a_rank(e):
            raise RankLostError(
                f"rank {rt.rank}: a collective failed at step {step} ({str(e).splitlines()[0][:200]}): another rank "
                f"died or did not answer within dist.timeout_s={cfg.dist.timeout_s} s. Run the same command again "
                "to resume from the last checkpoint") from e
        raise
    finally:
        metrics.close()
    tally.seconds = time.perf_counter() - t0
    tally.rss_end = current_rss_bytes()
    tally.comm_bytes_per_step = comms.per_step(max(cfg.train.steps - start, 1))
    return tally


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
