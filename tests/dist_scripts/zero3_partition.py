"""Run under torchrun: build the ZeRO-3 student the trainer builds and print each rank's share of it."""

import json
import sys

import torch

from ear_dist.config import load_config
from ear_dist.distributed.deepspeed_engine import build_student_engine, load_ds_config, prepare_deepspeed
from ear_dist.distributed.runtime import init_runtime
from ear_dist.models.janus import load_janus
from ear_dist.train.trainable import select_trainable_names

cfg = load_config(overrides=[f"model.path={sys.argv[1]}", "dist.deepspeed_config=ds_configs/zero3.json",
                             "trainable.first_k_layers=2", "train.pairs_per_step=2"])
rt = init_runtime(cfg)
bundle = load_janus(cfg.model.path, device="cpu", dtype="float32")
trainable = select_trainable_names(bundle.model, cfg.trainable)
prepare_deepspeed(rt.device)
engine, student = build_student_engine(cfg, rt, bundle.model, cfg.model.path, trainable,
                                       load_ds_config(cfg, 1, torch.float32), None)
params = dict(student.named_parameters())
opt_elements = sum(t.numel() for g in engine.optimizer.fp32_partitioned_groups_flat for t in [g])
print(json.dumps({
    "rank": rt.rank,
    "local": {n: int(params[n].ds_tensor.numel()) for n in trainable},
    "full": {n: int(params[n].ds_numel) for n in trainable},
    "optimizer_elements": int(opt_elements),
    "frozen_local": int(params["model.generation_head.vision_head.weight"].ds_tensor.numel()),
    "frozen_full": int(params["model.generation_head.vision_head.weight"].ds_numel),
}), flush=True)
