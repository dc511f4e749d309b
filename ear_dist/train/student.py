"""The trainable student M and its updater, in one process or under DeepSpeed ZeRO.

In one process the student owns copies of only the tensors it trains; every frozen
tensor is the teacher's own, shared read-only (no second copy of the model). Under
ZeRO 1-2 the same sharing holds and DeepSpeed owns gradients and optimizer state; under
ZeRO-3 the student is a fresh model partitioned across the student ranks as it loads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

from ear_dist.config import Config, ConfigError, OptimConfig
from ear_dist.train.adapters import EditSpec, effective_state, install
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
    """The student module, the updater the step drives, and what checkpoints and deltas need.

    ``trainable`` names the tensors a delta holds (the model's own names); with edited
    layers (LoRA, null space) the parameters that train are the edits, and the delta holds
    the effective weights.
    """

    module: torch.nn.Module
    updater: object  # Updater (MasterWeightUpdater for bf16/fp16), or DeepSpeedUpdater under ZeRO
    trainable: list[str]
    engine: Optional[object] = None  # the DeepSpeed engine
    zero_stage: Optional[int] = None  # None: no DeepSpeed
    edited: dict = field(default_factory=dict)  # weight name -> EditedLinear

    @property
    def num_trainable(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Full values of the delta's tensors on the CPU (a collective under ZeRO-3: call on every student rank)."""
        if self.edited:
            plain = [n for n in self.trainable if n not in self.edited]
            return {**trainable_state(self.module, plain), **effective_state(self.edited)}
        if self.zero_stage == 3:
            from ear_dist.distributed.deepspeed_engine import gather_full

            return gather_full(self.module, self.trainable)
        return trainable_state(self.module, self.trainable)

    def raw_state(self) -> dict[str, torch.Tensor]:
        """The parameters that train, under their module names, on the CPU (what a checkpoint holds)."""
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        if self.zero_stage == 3:
            from ear_dist.distributed.deepspeed_engine import gather_full

            return gather_full(self.module, names)
        return trainable_state(self.module, names)


def build_student(cfg: Config, rt, bundle, trainable: list[str], share_frozen: bool,
                  edits: Optional[EditSpec] = None) -> Student:
    """The student for this run: plain (one process) or a DeepSpeed engine (``dist.deepspeed_config``).

    ``share_frozen``: the teacher is a local read-only copy (colocated placement), so the
    student aliases its frozen tensors instead of holding a second model; otherwise the
    loaded model itself is trained in place. ``edits``: LoRA and/or null-space projected
    updates of the trained linear weights.
    """
    edits = edits if edits is not None and edits.active else None
    if cfg.dist.deepspeed_config == "none":
        if rt.dp_world > 1:
            raise ConfigError("dist.deepspeed_config: several student ranks need a DeepSpeed config "
                              "(e.g. dist.deepspeed_config=zero2)")
        module = _local_student(bundle.model, trainable, share_frozen)
        edited = install(module, trainable, edits, seed=cfg.train.seed) if edits else {}
        params = [p for p in module.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):  # bf16/fp16: float32 masters, as DeepSpeed keeps
            updater = MasterWeightUpdater(params, lambda masters: build_optimizer(masters, cfg.optim))
        else:
            updater = Updater(build_optimizer(params, cfg.optim))
        return Student(module, updater, trainable, edited=edited)

    from ear_dist.distributed.deepspeed_engine import (
        DeepSpeedUpdater, initialize_engine, load_ds_config, load_partitioned_model, prepare_deepspeed, zero_stage)

    prepare_deepspeed(rt.device)
    ds = load_ds_config(cfg, cfg.train.pairs_per_step // rt.dp_world, bundle.model.dtype)
    stage = zero_stage(ds)
    if stage == 3 and edits:
        raise ConfigError("trainable.adapter / preserve.nullspace: ZeRO-3 partitions the student as it loads, "
                          "before layers can be edited; use ZeRO-1 or 2 (ds_configs/zero2.json), whose replicated "
                          "weights hold the edits")
    if stage == 3:
        module = load_partitioned_model(cfg.model.path, bundle.model, ds)
        freeze_all_but(module, trainable)
    else:
        module = _local_student(bundle.model, trainable, share_frozen)
    edited = install(module, trainable, edits, seed=cfg.train.seed) if edits else {}
    module.eval()
    engine = initialize_engine(module, build_optimizer(module.parameters(), cfg.optim), ds, rt)
    return Student(engine.module, DeepSpeedUpdater(engine, rt.student_group), trainable, engine=engine,
                   zero_stage=stage, edited=edited)


def _local_student(model: torch.nn.Module, trainable: list[str], share_frozen: bool) -> torch.nn.Module:
    if share_frozen:
        return make_student(model, trainable)
    freeze_all_but(model, trainable)
    return model
