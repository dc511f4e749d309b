"""Run under torchrun: build the ZeRO-3 student the trainer builds and print each rank's share of it."""

import json
import os
import sys

from ear_dist.config import load_config
from ear_dist.distributed.runtime import init_runtime
from ear_dist.models.janus import load_janus
from ear_dist.train.student import build_student
from ear_dist.train.trainable import select_trainable_names

cfg = load_config(overrides=[f"model.path={sys.argv[1]}", "dist.deepspeed_config=ds_configs/zero3.json",
                             "trainable.first_k_layers=2", "train.pairs_per_step=2"])
rt = init_runtime(cfg)
bundle = load_janus(cfg.model.path, device="cpu", dtype="float32")
trainable = select_trainable_names(bundle.model, cfg.trainable)
student = build_student(cfg, rt, bundle, trainable, share_frozen=False)
params = dict(student.module.named_parameters())
opt_elements = sum(t.numel() for g in student.engine.optimizer.fp32_partitioned_groups_flat for t in [g])
line = json.dumps({
    "rank": rt.rank,
    "local": {n: int(params[n].ds_tensor.numel()) for n in trainable},
    "full": {n: int(params[n].ds_numel) for n in trainable},
    "optimizer_elements": int(opt_elements),
    "frozen_local": int(params["model.generation_head.vision_head.weight"].ds_tensor.numel()),
    "frozen_full": int(params["model.generation_head.vision_head.weight"].ds_numel),
})
os.write(sys.stdout.fileno(), (line + "\n").encode())  # one write: both ranks share the pipe
