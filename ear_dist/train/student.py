"""The trainable student M and its updater, in one process or under DeepSpeed ZeRO.

In one process the student owns copies of only the tensors it trains; every frozen
tensor is the teacher's own, shared read-only (no second copy of the model). Under
ZeRO 1-2 the same sharing holds and DeepSpeed owns gradients and optimizer state; under
ZeRO-3 the student is a fresh model partitioned across the student ranks as it loads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from ear_dist.config import Config, ConfigError, OptimConfig
from ear_dist.train.trainable import freeze_all_but
from ear_dist.train.updater import MasterWeightUpdater, Updater


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The config's torch optimizer over the parameters that require grad."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_student(teacher_model: torch.nn.Module, trainable: list[str], share_frozen: bool = True) -> torch.nn.Module:
    """A student whose ``trainable`` parameters are fresh copies and whose others alias the teacher's."""
    keep = set(trainable)
    memo = {}
    if share_frozen:
        for n, p in teacher_model.named_parameters():
            if n not in keep:
                memo[id(p)] = p
        for _, buf in teacher_model.named_buffers():
            memo[id(buf)] = buf
    student = copy.deepcopy(teacher_model, memo)
    freeze_all_but(student, trainable)
    student.train(False)  # no dropout in Janus, but keep the teacher's eval semantics explicit
    return student


def trainable_state(model: torch.nn.Module, trainable: list[str]) -> dict[str, torch.Tensor]:
    """The trained tensors, detached, on the CPU (what a delta stores)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu").contiguous().clone() for n in trainable}


@dataclass
class Student:
    """The student module, the updater the step drives, and what checkpoints need."""

    module: torch.nn.Module
    updater: object  # Updater (MasterWeightUpdater for bf16/fp16), or DeepSpeedUpdater under ZeRO
    trainable: list[str]
    engine: Optional[object] = None  # the DeepSpeed engine
    zero_stage: Optional[int] = None  # None: no DeepSpeed

    @property
    def num_trainable(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Full values of the trained tensors on the CPU (a collective under ZeRO-3: call on every student rank)."""
        if self.zero_stage == 3:
            from ear_dist.distributed.deepspeed_engine import gather_full

            return gather_full(self.module, self.trainable)
        return trainable_state(self.module, self.trainable)


def build_student(cfg: Config, rt, bundle, trainable: list[str], share_frozen: bool) -> Student:
    """The student for this run: plain (one process) or a DeepSpeed engine (``dist.deepspeed_config``).

    ``share_frozen``: the teacher is a local read-only copy (colocated placement), so the
    student aliases its frozen tensors instead of holding a second model; otherwise the
    loaded model itself is trained in place.
    """
    if cfg.dist.deepspeed_config == "none":
        if rt.dp_world > 1:
            raise ConfigError("dist.deepspeed_config: several student ranks need a DeepSpeed config "
                              "(e.g. dist.deepspeed_config=zero2)")
        module = _local_student(bundle.model, trainable, share_frozen)
        params = [p for p in module.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):  # bf16/fp16: float32 masters, as DeepSpeed keeps
            updater = MasterWeightUpdater(params, lambda masters: build_optimizer(masters, cfg.optim))
        else:
            updater = Updater(build_optimizer(params, cfg.optim))
        return Student(module, updater, trainable)

    from ear_dist.distributed.deepspeed_engine import (
        DeepSpeedUpdater, initialize_engine, load_ds_config, load_partitioned_model, prepare_deepspeed, zero_stage)

    prepare_deepspeed(rt.device)
    ds = load_ds_config(cfg, cfg.train.pairs_per_step // rt.dp_world, bundle.model.dtype)
    stage = zero_stage(ds)
    if stage == 3:
        module = load_partitioned_model(cfg.model.path, bundle.model, ds)
        freeze_all_but(module, trainable)
    else:
        module = _local_student(bundle.model, trainable, share_frozen)
    module.eval()
    engine = initialize_engine(module, build_optimizer(module.parameters(), cfg.optim), ds, rt)
    return Student(engine.module, DeepSpeedUpdater(engine, rt.student_group), trainable, engine=engine,
                   zero_stage=stage)


def _local_student(model: torch.nn.Module, trainable: list[str], share_frozen: bool) -> torch.nn.Module:
    if share_frozen:
        return make_student(model, trainable)
    freeze_all_but(model, trainable)
    return model
