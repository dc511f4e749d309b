"""The erasure job: load, build the parts, loop over steps, write the delta.

The same function runs in one process or on every rank of a launched job
(torchrun, srun, mpirun, deepspeed): ``ear_dist.launch.discover`` finds the rank, the runtime
assigns roles, and the parts are built (``train.job``) without the job knowing where the
teacher runs or which ZeRO stage holds the student. One run writes into a ``train.out_dir``
at a time (``run_lock``). Before anything is trained the run decides what to do with
its ``train.out_dir`` (``run_state``: resume, refuse, or start over), then the pairs
stream (``data.stream``: shards are read as they are needed) through the loop
(``train.loop``: non-finite guard, metrics and checkpoints are hooks around it).
"""


from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ear_dist.config import Config, ConfigError, config_yaml
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import check_source, source_digest
from ear_dist.errors import EarDistError
from ear_dist.models.delta import save_delta
from ear_dist.models.fingerprint import model_fingerprint
from ear_dist.storage import write_text_atomic
from ear_dist.train import adversarial, checkpoint, run_state
from ear_dist.train.job import Job, announce, build_job, check_launch, load_job_model, open_stream
from ear_dist.train.loop import (Checkpoints, Metrics, NonFiniteError, NonFiniteGuard, RankLostError, Tally,
                                 TrainingError, train_loop)
from ear_dist.train.run_lock import run_lock

__all__ = ["NonFiniteError", "RankLostError", "TrainingError", "run_erase"]

log = logging.getLogger("ear_dist.train")


def run_erase(cfg: Config, pairs: Optional[Sequence[PromptPair]] = None, progress: bool = True,
              should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Train the student to erase the pairs' concepts; write the delta; return a summary.

    ``pairs``: train on these instead of ``data.pairs``. ``should_stop`` is polled between
    steps (preemption, SIGINT): when it returns True the run writes a checkpoint and returns
    with ``"stopped": True``; the next run with the same ``train.out_dir`` resumes from it.
    A run whose identical twin already finished in ``train.out_dir`` returns that run's
    summary with ``"already_finished": True`` and trains nothing.
    """
    from ear_dist.distributed.runtime import init_runtime

    cfg.validate()
    if pairs is None:
        check_source(cfg)  # before minutes of model loading
    rt = init_runtime(cfg)
    out_dir = Path(cfg.train.out_dir)
    run_state.refuse_foreign(out_dir, cfg.train.resume)  # before the lock file is written into it
    with run_lock(out_dir, rt):
        torch.manual_seed(cfg.train.seed)
        bundle = load_job_model(cfg.model, rt)
        _check_settings(cfg, rt, bundle)
        fingerprint = model_fingerprint(bundle.model)
        finished = _finished_twin(cfg, rt, fingerprint, pairs)
        if finished is not None:
            return finished
        stream, check = open_stream(cfg, rt, bundle, pairs)  # the data's own errors come before the directory's
        try:
            run = _Run.of(cfg, rt, fingerprint, pairs)
            resume = run_state.decide(out_dir, cfg.train.resume, run.identity, cfg.train.steps)
            _prepare_out_dir(cfg, rt, run, resume)
            adversarial.check_stream(cfg, stream)
            if resume.checkpoint is not None:
                adversarial.replay(cfg, stream, out_dir, int(resume.checkpoint["data"].get("step", 0)))
                stream.load_state_dict(resume.checkpoint["data"])  # continue with the sample after the last trained
            job = build_job(cfg, rt, bundle, stream, teacher_steps=cfg.train.steps - resume.step)
            if job.serves_teacher:
                return {**job.teacher.serve(stream, resume.step), "rank": rt.rank}
            announce(job, cfg.dist)
            if resume.checkpoint is not None:
                _restore(job, out_dir, resume.step)
            hooks = [NonFiniteGuard(job), Metrics(job, out_dir, progress, resume.step),
                     Checkpoints(job, out_dir, run.identity)]
            if adversarial.enabled(cfg):  # its pairs join before a checkpoint of the same step is written
                hooks.insert(1, adversarial.AdversarialPairs(job, out_dir, resume.step))
            tally = train_loop(job, resume.step, hooks, should_stop)
        finally:
            stream.close()
        if tally.stopped_at is not None:
            return {"stopped": True, "step": tally.stopped_at, "checkpoint": str(checkpoint.latest(out_dir))}
        return _save(job, run, resume, tally, len(check.missing_concept))


@dataclass
class _Run:
    """What identifies the run in its directory: the base model's fingerprint and the run identity."""

    base_fingerprint: str
    identity: "run_state.RunIdentity"

    @classmethod
    def of(cls, cfg: Config, rt, fingerprint: str, pairs) -> "_Run":
        return cls(fingerprint, run_state.run_identity(cfg, fingerprint, source_digest(cfg, pairs),
                                                       _deepspeed_settings(cfg, rt), rt.dp_world))


def _finished_twin(cfg: Config, rt, fingerprint: str, pairs) -> Optional[dict]:
    """The summary of an identical run that already finished in ``train.out_dir``, checked before the pair
    stream opens (its readers, its checks); None when there is none. Anything amiss (the data, another run
    there) is left to the checks that follow, which name it."""
    out_dir = Path(cfg.train.out_dir)
    if cfg.train.resume == "never" or not (out_dir / run_state.RUN_FILE).is_file():
        return None
    try:
        resume = run_state.decide(out_dir, cfg.train.resume, _Run.of(cfg, rt, fingerprint, pairs).identity,
                                  cfg.train.steps)
    except (OSError, EarDistError):
        return None
    if resume.finished is None:
        return None
    log.warning("%s: this run already finished at step %s with the same settings (its delta: %s); nothing to "
                "do. Raise train.steps to extend it, or train.resume=never to train it again", out_dir,
                resume.step, resume.finished.get("delta"), extra={"shared": True})
    return {**resume.finished, "already_finished": True}


def _restore(job: Job, out_dir: Path, start: int) -> None:
    """The student, its optimizer, the RNGs and the preservation state from the newest checkpoint."""
    _, parts = checkpoint.restore(out_dir, job.rt, job.student, job.generator)
    if job.keep.preservation is not None and "preservation" in parts:
        job.keep.preservation.load_state_dict(parts["preservation"])
    log.info("resuming from %s at step %d", checkpoint.latest(out_dir), start, extra={"shared": True})


def _save(job: Job, run: _Run, resume: "run_state.Resume", tally: Tally, missing_concept: int) -> dict:
    """The delta (checked finite first), the summary and the finished run's record; returns the summary."""
    cfg, rt, out_dir = job.cfg, job.rt, Path(job.cfg.train.out_dir)
    trained = job.student.trained_state()  # collective under ZeRO-3
    summary = tally.summary(cfg, resume.step, missing_concept, job.student.num_trainable, rt.dp_world,
                            job.stream.replaced)
    if rt.is_main:
        _check_finite(trained, cfg)
        concepts = job.stream.concepts() or [cfg.erase.concept]
        provenance = {"run_hash": run.identity.hash, "identity": run.identity.keys, "trained_steps": cfg.train.steps,
                      "segments": resume.segments}
        delta = save_delta(out_dir / "delta.safetensors", trained, run.base_fingerprint, cfg.model.path, concepts,
                           cfg.to_dict(), provenance)
        summary["delta"] = str(delta)
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
        run_state.write_record(out_dir, run.identity, cfg.train.steps, resume.segments, finished_step=cfg.train.steps)
    return summary


def _check_finite(trained: dict, cfg: Config) -> None:
    """A delta with a NaN or an infinity is never written: the merged model would be broken."""
    bad = [name for name, t in trained.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"the trained delta is not finite in {len(bad)} of {len(trained)} tensors (e.g. "
                             f"{bad[0]}); it was not written. Lower optim.lr (now {cfg.optim.lr:g}) or check "
                             "model.dtype")


def _check_settings(cfg: Config, rt, bundle) -> None:
    """Settings that only the model and the launch can validate."""
    if bundle.scale_sizes is None and cfg.erase.window_len > bundle.num_image_tokens:  # next-scale: window_scales
        raise ConfigError(f"erase.window_len: {cfg.erase.window_len} > the model's {bundle.num_image_tokens} "
                          "image tokens")
    check_launch(cfg.train, rt)


def _deepspeed_settings(cfg: Config, rt) -> Optional[dict]:
    if cfg.dist.deepspeed_config == "none":
        return None
    from ear_dist.distributed.deepspeed_engine import load_ds_config

    return load_ds_config(cfg, cfg.train.pairs_per_step // rt.dp_world, torch.float32)


def _prepare_out_dir(cfg: Config, rt, run: _Run, resume: "run_state.Resume") -> None:
    """Every rank has read ``train.out_dir`` and decided alike; now the main rank clears and records (``run_state``)."""
    _barrier(rt)  # everyone has read the directory before the main rank changes it
    if rt.is_main:
        out_dir = Path(cfg.train.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_state.prepare(out_dir, resume, run.identity, cfg.train.steps)
        write_text_atomic(out_dir / "config.yaml", config_yaml(cfg))
    _barrier(rt)


def _barrier(rt) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()
