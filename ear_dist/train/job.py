"""The erasure job's parts, built from a config in one place.

``ear-dist erase`` trains what :func:`build_job` returns and ``ear-dist bench`` times the
same object (wrapping its teacher and updater in timers with :meth:`Job.make_step`), so
what is timed is what trains: the same model loader, teacher placement, trainable
selection, preserving parts (anchors, null-space projectors, preservation term), student
and updater, and step. Order matters for bitwise-equal deltas: the preserving parts are
built from the base model before the student exists, and nothing here draws from the
global RNG after ``torch.manual_seed(train.seed)`` but the builders, in this order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ear_dist.config import Config, ConfigError, DistConfig, ModelConfig, TrainConfig
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import PairStream, check_prompt_lengths, load_training_pairs, open_pair_stream
from ear_dist.models.family import load_model
from ear_dist.models.interface import ImageModel
from ear_dist.teacher.base import Teacher, TeacherSettings, build_teacher
from ear_dist.train.adapters import linear_weights
from ear_dist.train.preserve import PreservingParts, build_preserving_parts
from ear_dist.train.step import ErasureStep
from ear_dist.train.student import Student, build_student
from ear_dist.train.trainable import select_trainable_names
from ear_dist.train.updater import Updater

log = logging.getLogger("ear_dist.train")


@dataclass
class Job:
    """One rank's parts of an erasure job. On a dedicated teacher rank only ``teacher`` and ``stream`` are set."""

    cfg: Config
    rt: object  # ear_dist.distributed.runtime.Runtime
    bundle: ImageModel
    stream: object  # PairStream or ShardPairStream: ``next()``, ``state_dict()``, ``close()``
    settings: TeacherSettings
    teacher: Teacher
    trainable: Optional[list[str]] = None
    keep: Optional[PreservingParts] = None
    student: Optional[Student] = None
    generator: Optional[torch.Generator] = None
    step: Optional[ErasureStep] = None

    @property
    def serves_teacher(self) -> bool:
        return self.student is None

    def make_step(self, teacher: Optional[Teacher] = None, updater: Optional[Updater] = None) -> ErasureStep:
        """The job's step; ``teacher`` / ``updater`` replace the job's own (the benchmark's timed wrappers)."""
        return ErasureStep(self.student.module, self.bundle, teacher or self.teacher, self.cfg.erase,
                           updater or self.student.updater, self.generator, self.settings,
                           preservation=self.keep.preservation)


def load_job_model(m: ModelConfig, rt) -> ImageModel:
    """The base model of ``model.*`` on this rank's device (``model.family`` picks the loader)."""
    return load_model(m.path, m.family, device=rt.device, dtype=m.dtype, seed=m.seed)


def open_stream(cfg: Config, rt, bundle: ImageModel, pairs: Optional[Sequence[PromptPair]] = None):
    """The run's pair stream for this rank (``data.pairs``, or ``pairs`` held in memory) and its PairCheck."""
    stream, check = open_pair_stream(cfg, pairs, rt.dp_world, rt.data_slices(), bundle.num_image_tokens,
                                     bundle.codebook_size)
    if isinstance(stream, PairStream):  # held whole: every prompt's length is checked before any work
        check_prompt_lengths(stream.pairs, bundle)
    return stream, check


def check_launch(train: TrainConfig, rt) -> None:
    """Settings that only the launch can validate."""
    if train.pairs_per_step % rt.dp_world:
        raise ConfigError(f"train.pairs_per_step: {train.pairs_per_step} is not divisible by the "
                          f"{rt.dp_world} student ranks")


def build_job(cfg: Config, rt, bundle: ImageModel, stream, teacher_steps: int) -> Job:
    """Teacher, trainable selection, preserving parts, student and updater, and the step, over ``stream``.

    ``teacher_steps``: the steps this process still runs (an offline or dedicated teacher
    sizes its work by them). The preserving parts see the base model before any update.
    """
    settings = TeacherSettings.from_config(cfg.erase, cfg.rollout)
    teacher = build_teacher(cfg, rt, bundle, settings, steps=teacher_steps)
    job = Job(cfg, rt, bundle, stream, settings, teacher)
    if rt.role == "teacher":
        return job
    trainable = select_trainable_names(bundle.model, cfg.trainable)
    if cfg.preserve.nullspace:
        trainable = projectable(bundle.model, trainable, rt.is_main)
    keep = build_preserving_parts(cfg, rt, bundle, trainable, _surrogate_source(cfg, stream))
    job.trainable, job.keep = trainable, keep
    job.student = build_student(cfg, rt, bundle, trainable, share_frozen=teacher.shares_model, edits=keep.edits)
    job.generator = torch.Generator().manual_seed(cfg.train.seed + rt.dp_rank)
    job.step = job.make_step()
    return job


def _surrogate_source(cfg: Config, stream) -> Sequence[PromptPair]:
    """The pairs whose surrogates may join the anchors: every rank holds all pairs (in memory, or a shard
    directory read whole once more), so every rank holds the same anchors."""
    if not cfg.preserve.surrogates:
        return ()
    return stream.pairs if isinstance(stream, PairStream) else load_training_pairs(cfg)


def projectable(model: torch.nn.Module, trainable: list[str], announce: bool) -> list[str]:
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


def announce(job: Job, dist: DistConfig) -> None:
    """What the job trains, on the main rank's log."""
    rt, student, keep, p = job.rt, job.student, job.keep, job.cfg.preserve
    if not rt.is_main:
        return
    n_total = sum(t.numel() for t in job.bundle.model.parameters())
    stage = student.zero_stage if student.zero_stage is not None else "off"
    log.info("trainable parameters: %s in %d tensors (%.2f%% of %s); student ranks %d, teacher %s, ZeRO %s",
             f"{student.num_trainable:,}", len(student.trainable), 100 * student.num_trainable / n_total,
             f"{n_total:,}", rt.dp_world, dist.teacher_placement, stage)
    if keep.anchors:
        log.info("anchors: %d prompts (%d of them the training pairs' surrogates, preserve.surrogates=%d)",
                 keep.anchors, keep.surrogate_anchors, p.surrogates)
    if keep.nullspace_ranks:
        spans = sorted(set(keep.nullspace_ranks.values()))
        log.info("null-space updates: %d layers, preserved input span of rank %s (%g%% of the anchors' input "
                 "energy)", len(keep.nullspace_ranks), spans, 100 * p.nullspace_energy)
