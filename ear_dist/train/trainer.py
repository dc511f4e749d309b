"""The erasure job: load, select, loop over steps, log, write the delta.

Single-process here; the distributed engine wraps the same step (see ear_dist.distributed).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ear_dist.config import Config, ConfigError, OptimConfig, save_config
from ear_dist.data.pairs import PromptPair
from ear_dist.models.janus import load_janus, model_fingerprint
from ear_dist.teacher.engine import ColocatedTeacher
from ear_dist.train.delta import save_delta
from ear_dist.train.step import ErasureStep, PairBatch, StepResult, Updater
from ear_dist.train.student import make_student, trainable_state
from ear_dist.train.trainable import select_trainable_names

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


@dataclass
class PairCheck:
    """Counts from validating pairs before training."""

    missing_concept: list[str] = field(default_factory=list)


def check_pairs(pairs: Sequence[PromptPair], on_missing_concept: str, num_image_tokens: int) -> PairCheck:
    """Reject empty prompts; warn about (or reject) target prompts without their concept word."""
    if not pairs:
        raise ConfigError("data.pairs: no prompt pairs to train on")
    report = PairCheck()
    for i, p in enumerate(pairs):
        where = f"pair {i} (id {p.id}, source {p.source or '-'})"
        if not p.target.strip():
            raise ValueError(f"{where}: field 'target' is empty")
        if not p.surrogate.strip():
            raise ValueError(f"{where}: field 'surrogate' is empty")
        if p.concept and p.concept.lower() not in p.target.lower():
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


def pair_batches(pairs: Sequence[PromptPair], per_step: int, seed: int, shuffle: bool) -> Iterator[list[PromptPair]]:
    """Endless batches of ``per_step`` pairs, reshuffled each pass (seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pairs), generator=g).tolist() if shuffle else list(range(len(pairs)))
        for s in range(0, len(order) - per_step + 1, per_step):
            yield [pairs[i] for i in order[s : s + per_step]]
        if per_step > len(pairs):
            raise ConfigError(f"train.pairs_per_step: {per_step} > the {len(pairs)} pairs available")


def to_batch(pairs: Sequence[PromptPair], step: int, rollout_from: str, device) -> PairBatch:
    """Pairs -> PairBatch; supplied rollout tokens are used only when every pair has them."""
    key = "surrogate_tokens" if rollout_from == "surrogate" else "target_tokens"
    toks = [getattr(p, key) for p in pairs]
    tokens = torch.tensor(toks, dtype=torch.long, device=device) if all(t is not None for t in toks) else None
    seeds = [p.seed if p.seed >= 0 else step * len(pairs) + i for i, p in enumerate(pairs)]
    return PairBatch([p.target for p in pairs], [p.surrogate for p in pairs], [p.concept for p in pairs], seeds, tokens)


def load_training_pairs(cfg: Config) -> list[PromptPair]:
    """The pairs named by ``data.pairs`` (any supported format)."""
    from ear_dist.data.readers import ReadReport, read_pairs

    if not cfg.data.pairs:
        raise ConfigError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    report = ReadReport()
    pairs = read_pairs(cfg.data.pairs, cfg.data.format, cfg.data.on_error, cfg.erase.concept, report)
    if report.skipped:
        log.warning("%s: skipped %d malformed rows: %s", cfg.data.pairs, report.skipped, report.skip_reasons[:5])
    return pairs


class MetricsLog:
    """TensorBoard scalars and JSON lines for one run."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, step: int, scalars: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def run_erase(cfg: Config, pairs: Optional[Sequence[PromptPair]] = None, progress: bool = True) -> dict:
    """Train the student to erase ``cfg.erase.concept`` from the pairs; write the delta; return a summary."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    bundle = load_janus(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    if cfg.erase.window_len > bundle.num_image_tokens:
        raise ConfigError(f"erase.window_len: {cfg.erase.window_len} > the model's {bundle.num_image_tokens} image tokens")
    pairs = list(pairs) if pairs is not None else load_training_pairs(cfg)
    check = check_pairs(pairs, cfg.erase.on_missing_concept, bundle.num_image_tokens)

    base_fp = model_fingerprint(bundle.model)
    trainable = select_trainable_names(bundle.model, cfg.trainable)
    r = cfg.rollout
    teacher = ColocatedTeacher(bundle, r.cfg_weight, r.temperature, r.top_k, r.greedy)
    student = make_student(bundle.model, trainable)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in bundle.model.parameters())
    print(f"trainable parameters: {n_train:,} in {len(trainable)} tensors ({100 * n_train / n_total:.2f}% of {n_total:,})")
    optimizer = build_optimizer(student.parameters(), cfg.optim)
    step_fn = ErasureStep(student, bundle, teacher, cfg.erase, Updater(optimizer),
                          torch.Generator().manual_seed(cfg.train.seed))

    metrics = MetricsLog(out_dir, cfg.train.tensorboard)
    batches = pair_batches(pairs, cfg.train.pairs_per_step, cfg.train.seed, cfg.data.shuffle)
    steps = range(cfg.train.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"erasing {cfg.erase.concept!r}", unit="step")
    nonfinite, kept, total, opt_steps, tokens = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    last: Optional[StepResult] = None
    try:
        for step in steps:
            batch = to_batch(next(batches), step, cfg.erase.rollout_from, bundle.device)
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
                           "optimizer_steps": last.optimizer_steps, **{k: v for k, v in last.extras.items()}}
                metrics.write(step, scalars)
                if progress:
                    steps.set_postfix(loss=f"{last.loss:.4g}", kept=f"{last.windows_kept}/{last.windows_total}")
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                _write_delta(out_dir / f"delta-step{step + 1}.safetensors", student, trainable, base_fp, cfg, pairs)
    finally:
        metrics.close()
    elapsed = time.perf_counter() - t0
    delta = _write_delta(out_dir / "delta.safetensors", student, trainable, base_fp, cfg, pairs)
    summary = {
        "delta": str(delta), "steps": cfg.train.steps, "optimizer_steps": opt_steps, "windows_kept": kept,
        "windows_total": total, "nonfinite_steps": nonfinite, "missing_concept": len(check.missing_concept),
        "last_loss": last.loss if last else None, "seconds": elapsed,
        "image_tokens_per_s": tokens / elapsed if elapsed > 0 else None, "trainable_parameters": n_train,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_delta(path: Path, student, trainable, base_fp: str, cfg: Config, pairs) -> Path:
    concepts = sorted({p.concept for p in pairs if p.concept}) or [cfg.erase.concept]
    return save_delta(path, trainable_state(student, trainable), base_fp, cfg.model.path, concepts, cfg.to_dict())
