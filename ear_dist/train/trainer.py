"""The erasure job: load, place the teacher, build the student, loop over steps, write the delta.

The same function runs in one process or on every rank of a launched job
(torchrun, srun, mpirun, deepspeed): ``launch.discover`` finds the rank, the runtime
assigns roles, and the step is the same code whatever the placement of the teacher
or the ZeRO stage of the student. All ranks draw the same stream of global batches
(``train.pairs_per_step`` pairs per optimizer step, seeded); student rank r trains on
its slice of each, so one process and N processes see the same data.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ear_dist.config import Config, ConfigError, OptimConfig, save_config
from ear_dist.data.pairs import PromptPair
from ear_dist.models.janus import load_janus, model_fingerprint
from ear_dist.teacher.engine import ColocatedTeacher
from ear_dist.train.delta import save_delta
from ear_dist.train.step import ErasureStep, PairBatch, StepResult, Updater
from ear_dist.train.student import make_student, trainable_state
from ear_dist.train.trainable import freeze_all_but, select_trainable_names

log = logging.getLogger("ear_dist.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses); the message says why."""


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- pairs


@dataclass
class PairCheck:
    """Counts from validating pairs before training."""

    missing_concept: list[str] = field(default_factory=list)


def check_pairs(pairs: Sequence[PromptPair], on_missing_concept: str, num_image_tokens: int) -> PairCheck:
    """Reject empty prompts; warn about (or reject) target prompts without their concept word
    (preservation anchors, whose surrogate is the target itself, carry no concept word)."""
    if not pairs:
        raise ConfigError("data.pairs: no prompt pairs to train on")
    report = PairCheck()
    for i, p in enumerate(pairs):
        where = f"pair {i} (id {p.id}, source {p.source or '-'})"
        if not p.target.strip():
            raise ValueError(f"{where}: field 'target' is empty")
        if not p.surrogate.strip():
            raise ValueError(f"{where}: field 'surrogate' is empty")
        if p.concept and not p.is_anchor and p.concept.lower() not in p.target.lower():
            msg = f"{where}: target prompt {p.target!r} does not contain the concept {p.concept!r}"
            if on_missing_concept == "fail":
                raise ValueError(msg + " (set erase.on_missing_concept=warn to train on it anyway)")
            report.missing_concept.append(p.id)
            log.warning(msg)
        for name in ("surrogate_tokens", "target_tokens"):
            toks = getattr(p, name)
            if toks is not None and len(toks) != num_image_tokens:
                raise ValueError(f"{where}: field {name!r} has {len(toks)} tokens, the model makes {num_image_tokens}")
    return report


def global_batches(pairs: Sequence[PromptPair], per_step: int, seed: int, shuffle: bool) -> Iterator[list[tuple]]:
    """Endless global batches of ``per_step`` (position in the batch, pair), reshuffled each pass (seeded,
    the same on every rank)."""
    if per_step > len(pairs):
        raise ConfigError(f"train.pairs_per_step: {per_step} > the {len(pairs)} pairs available")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pairs), generator=g).tolist() if shuffle else list(range(len(pairs)))
        for s in range(0, len(order) - per_step + 1, per_step):
            yield [(pos, pairs[i]) for pos, i in enumerate(order[s : s + per_step])]


def to_batch(items: Sequence[tuple], step: int, per_step: int, rollout_from: str, device) -> PairBatch:
    """(position in the global batch, pair) items -> PairBatch; supplied rollout tokens are used when every pair has them.

    A pair without its own seed gets ``step * per_step + position in the global batch``,
    so a pair's rollout does not depend on how many ranks share the batch.
    """
    key = "surrogate_tokens" if rollout_from == "surrogate" else "target_tokens"
    toks = [getattr(p, key) for _, p in items]
    tokens = None
    if all(t is not None for t in toks):
        tokens = torch.from_numpy(np.stack([np.asarray(t, dtype=np.int64) for t in toks])).to(device)
    seeds = [p.seed if p.seed >= 0 else step * per_step + pos for pos, p in items]
    pairs = [p for _, p in items]
    return PairBatch([p.target for p in pairs], [p.surrogate for p in pairs], [p.concept for p in pairs], seeds,
                     tokens)


def load_training_pairs(cfg: Config) -> list[PromptPair]:
    """The pairs named by ``data.pairs`` (any supported format, or a shard directory)."""
    from ear_dist.data.readers import ReadReport, read_pairs

    if not cfg.data.pairs:
        raise ConfigError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    report = ReadReport()
    pairs = read_pairs(cfg.data.pairs, cfg.data.format, cfg.data.on_error, cfg.erase.concept, report)
    if report.skipped:
        log.warning("%s: skipped %d malformed rows: %s", cfg.data.pairs, report.skipped, report.skip_reasons[:5])
    return pairs


# ----------------------------------------------------------------------------- checkpoints

CKPT = "checkpoint"


def save_checkpoint(out_dir: Path, step: int, trained: dict, optimizer_state: Optional[dict], generator: torch.Generator,
                    extra: dict) -> Path:
    """Atomically write what a resume needs: trained tensors, optimizer state, step, RNG states."""
    from safetensors.torch import save_file

    final = out_dir / CKPT
    tmp = out_dir / (CKPT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp / "trainable.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()},
               tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
    old = out_dir / (CKPT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(out_dir: Path) -> Optional[dict]:
    f = out_dir / CKPT / "state.json"
    return json.loads(f.read_text()) if f.is_file() else None


# ----------------------------------------------------------------------------- the job


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

    bundle = load_janus(cfg.model.path, device=rt.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    if cfg.erase.window_len > bundle.num_image_tokens:
        raise ConfigError(f"erase.window_len: {cfg.erase.window_len} > the model's {bundle.num_image_tokens} image tokens")
    pairs = list(pairs) if pairs is not None else load_training_pairs(cfg)
    check = check_pairs(pairs, cfg.erase.on_missing_concept, bundle.num_image_tokens)
    if cfg.train.pairs_per_step % rt.dp_world:
        raise ConfigError(f"train.pairs_per_step: {cfg.train.pairs_per_step} is not divisible by the "
                          f"{rt.dp_world} student ranks")
    per_rank = cfg.train.pairs_per_step // rt.dp_world
    batches = global_batches(pairs, cfg.train.pairs_per_step, cfg.train.seed, cfg.data.shuffle)
    base_fp = model_fingerprint(bundle.model)
    trainable = select_trainable_names(bundle.model, cfg.trainable)
    r = cfg.rollout
    local_teacher = ColocatedTeacher(bundle, r.cfg_weight, r.temperature, r.top_k, r.greedy)

    def local_batch(step: int, global_items, student_rank: int) -> PairBatch:
        dp = rt.student_ranks.index(student_rank)
        return to_batch(global_items[dp * per_rank : (dp + 1) * per_rank], step, cfg.train.pairs_per_step,
                        cfg.erase.rollout_from, bundle.device)

    # a resumed run skips what was trained: the batch stream is deterministic
    state = read_checkpoint_state(out_dir)
    start = int(state["step"]) if state is not None else 0
    for _ in range(start):
        next(batches)

    if rt.role == "teacher":
        return _serve_as_teacher(cfg, rt, bundle, local_teacher, batches, local_batch, per_rank, start)

    # ------------------------------------------------------------------ the teacher this student uses
    teacher = local_teacher
    if cfg.dist.teacher_placement == "dedicated":
        from ear_dist.teacher.dedicated import DedicatedTeacher, payload_for

        teacher = DedicatedTeacher(rt.teacher_of(rt.rank), payload_for(cfg, bundle.model, per_rank),
                                   cfg.train.steps - start, bundle.device)
    elif cfg.dist.teacher_placement == "offline":
        from ear_dist.teacher.offline import OfflineTeacher

        if not cfg.dist.teacher_dir:
            raise ConfigError("dist.teacher_dir: the offline placement needs the directory written by "
                              "`ear-dist teacher precompute`")
        teacher = OfflineTeacher(cfg.dist.teacher_dir, bundle.device, bundle.model.dtype)

    # ------------------------------------------------------------------ the student
    ds_stage = None
    if cfg.dist.deepspeed_config != "none":
        from ear_dist.distributed.deepspeed_engine import (
            DeepSpeedUpdater, build_student_engine, load_ds_config, prepare_deepspeed, zero_stage)

        prepare_deepspeed(rt.device)
        ds = load_ds_config(cfg, per_rank, bundle.model.dtype)
        ds_stage = zero_stage(ds)
        share = bundle.model if cfg.dist.teacher_placement == "colocated" else None
        engine, student = build_student_engine(cfg, rt, bundle.model, cfg.model.path, trainable, ds, share)
        updater = DeepSpeedUpdater(engine, rt.student_group)
        optimizer = None
    else:
        if rt.dp_world > 1:
            raise ConfigError("dist.deepspeed_config: several student ranks need a DeepSpeed config "
                              "(e.g. ds_configs/zero2.json)")
        if cfg.dist.teacher_placement == "colocated":
            student = make_student(bundle.model, trainable)
        else:
            student = bundle.model
            freeze_all_but(student, trainable)
        optimizer = build_optimizer(student.parameters(), cfg.optim)
        updater = Updater(optimizer)
        engine = None
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in student.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in bundle.model.parameters())
    if rt.is_main:
        print(f"trainable parameters: {n_train:,} in {len(trainable)} tensors "
              f"({100 * n_train / n_total:.2f}% of {n_total:,}); student ranks {rt.dp_world}, "
              f"teacher {cfg.dist.teacher_placement}, ZeRO {ds_stage if ds_stage is not None else 'off'}")
    generator = torch.Generator().manual_seed(cfg.train.seed + rt.dp_rank)
    step_fn = ErasureStep(student, bundle, teacher, cfg.erase, updater, generator)

    if state is not None:
        _restore(out_dir, student, trainable, optimizer, engine, generator)
        if rt.is_main:
            print(f"resuming from {out_dir / CKPT} at step {start}")

    from ear_dist.telemetry.writer import MetricsWriter

    concept_names = sorted({p.concept for p in pairs if p.concept})
    metrics = MetricsWriter(out_dir, reductions={"windows_*": "sum", "window_loss_sum/*": "sum",
                                                 "optimizer_steps": "max"},
                            tensorboard=cfg.train.tensorboard, group=rt.student_group)
    comm_at_start = {}
    if ds_stage is not None and cfg.dist.log_comms:  # leave out the engine's one-time init broadcast
        from ear_dist.distributed.deepspeed_engine import comm_bytes

        comm_at_start = comm_bytes()
    steps = range(start, cfg.train.steps)
    if progress and rt.is_main:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"erasing {cfg.erase.concept!r}", unit="step", initial=start, total=cfg.train.steps)
    nonfinite, kept, total, opt_steps, tokens = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    last: Optional[StepResult] = None
    stopped = False
    try:
        for step in steps:
            items = next(batches)
            batch = local_batch(step, items, rt.rank)
            if cfg.dist.teacher_placement == "offline":
                teacher.bind(batch.target_prompts, batch.surrogate_prompts, batch.seeds)
                if batch.tokens is None:
                    batch.tokens = teacher.lookup_tokens(batch.target_prompts, batch.surrogate_prompts, batch.seeds)
            last = step_fn(batch)
            tokens += last.image_tokens
            if last.nonfinite:
                nonfinite += 1
                log.warning("step %d: non-finite loss %s, skipped (%d so far)", step, last.loss, nonfinite)
                if nonfinite >= cfg.train.max_nonfinite_steps:
                    raise TrainingError(
                        f"{nonfinite} steps with a non-finite loss (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}); last at step {step}. Lower optim.lr or check the model dtype."
                    )
                continue
            kept, total, opt_steps = kept + last.windows_kept, total + last.windows_total, opt_steps + last.optimizer_steps
            if step % cfg.train.log_every == 0:
                scalars = {"loss": last.loss, "windows_kept": last.windows_kept, "windows_total": last.windows_total,
                           "optimizer_steps": last.optimizer_steps, **last.extras}
                if len(concept_names) > 1:  # joint run: the same names on every rank (all concepts)
                    for c in concept_names:
                        k, n, l = last.per_concept.get(c, (0, 0, 0.0))
                        scalars.update({f"windows_kept/{c}": k, f"windows_total/{c}": n, f"window_loss_sum/{c}": l})
                metrics.write(step, scalars)
                if progress and rt.is_main:
                    steps.set_postfix(loss=f"{last.loss:.4g}", kept=f"{last.windows_kept}/{last.windows_total}")
            every = cfg.train.checkpoint_every
            stop_now = updater.global_any(bool(should_stop())) if should_stop is not None else False
            if (every and (step + 1) % every == 0) or stop_now:
                _checkpoint(out_dir, rt, student, trainable, optimizer, engine, ds_stage, generator, step + 1)
            if stop_now:
                stopped = True
                break
    finally:
        metrics.close()
    elapsed = time.perf_counter() - t0
    if stopped:
        return {"stopped": True, "step": step + 1, "checkpoint": str(out_dir / CKPT)}
    trained = _gather(student, trainable, ds_stage)
    delta = None
    if rt.is_main:
        concepts = sorted({p.concept for p in pairs if p.concept}) or [cfg.erase.concept]
        delta = save_delta(out_dir / "delta.safetensors", trained, base_fp, cfg.model.path, concepts, cfg.to_dict())
    summary = {
        "delta": str(delta) if delta else None, "steps": cfg.train.steps, "resumed_from": start,
        "optimizer_steps": opt_steps, "windows_kept": kept, "windows_total": total, "nonfinite_steps": nonfinite,
        "missing_concept": len(check.missing_concept), "last_loss": last.loss if last else None,
        "seconds": elapsed, "image_tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "trainable_parameters": n_train, "student_ranks": rt.dp_world,
    }
    if ds_stage is not None and cfg.dist.log_comms:
        from ear_dist.distributed.deepspeed_engine import comm_bytes

        moved = comm_bytes()
        ran = max(cfg.train.steps - start, 1)
        summary["comm_bytes_per_step"] = {op: (b - comm_at_start.get(op, 0)) / ran for op, b in moved.items()}
    if rt.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _gather(student, trainable, ds_stage) -> dict:
    if ds_stage is None:
        return trainable_state(student, trainable)
    from ear_dist.distributed.deepspeed_engine import gather_trainable

    return gather_trainable(student, trainable, ds_stage)


def _checkpoint(out_dir, rt, student, trainable, optimizer, engine, ds_stage, generator, step) -> None:
    trained = _gather(student, trainable, ds_stage)  # collective under ZeRO-3
    if engine is not None:  # each rank writes its optimizer partition
        engine.save_checkpoint(str(out_dir / "deepspeed"), tag=f"step{step}")
    if rt.is_main:
        save_checkpoint(out_dir, step, trained, optimizer.state_dict() if optimizer else None, generator,
                        {"deepspeed_tag": f"step{step}" if engine is not None else None})
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier(group=rt.student_group)


def _restore(out_dir, student, trainable, optimizer, engine, generator) -> int:
    from safetensors.torch import load_file

    ckpt = out_dir / CKPT
    state = json.loads((ckpt / "state.json").read_text())
    if engine is not None:
        engine.load_checkpoint(str(out_dir / "deepspeed"), tag=state["deepspeed_tag"])
    else:
        trained = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(student.named_parameters())
        with torch.no_grad():
            for n in trainable:
                params[n].copy_(trained[n])
        if optimizer is not None and (ckpt / "optimizer.pt").is_file():
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    generator.set_state(rng["generator"])
    return int(state["step"])


def _serve_as_teacher(cfg, rt, bundle, teacher, batches, local_batch, per_rank, start: int) -> dict:
    from ear_dist.teacher.dedicated import payload_for, serve

    served = [s for s in rt.student_ranks if rt.teacher_of(s) == rt.rank]
    payload = payload_for(cfg, bundle.model, per_rank)
    cache: dict = {}

    def batch_for(i: int, student_rank: int) -> PairBatch:
        step = start + i
        if step not in cache:
            cache.clear()
            cache[step] = next(batches)
        return local_batch(step, cache[step], student_rank)

    t0 = time.perf_counter()
    n = serve(teacher, payload, served, batch_for, cfg.train.steps - start)
    return {"role": "teacher", "rank": rt.rank, "steps": n, "students": served, "seconds": time.perf_counter() - t0}
