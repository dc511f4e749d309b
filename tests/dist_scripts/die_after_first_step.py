"""Run as rank 0 and rank 1 of a 2-rank job: rank 1 dies once training has started."""

import os
import sys

from ear_dist.config import load_config
from ear_dist.train.trainer import run_erase

model, pairs, out = sys.argv[1:4]
calls = {"n": 0}


def should_stop():
    calls["n"] += 1
    if os.environ["RANK"] == "1" and calls["n"] == 2:
        print("rank 1 exits now", flush=True)
        os._exit(17)
    return False


cfg = load_config(overrides=[f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}",
                             "train.steps=50", "erase.window_len=4", "train.pairs_per_step=2",
                             "dist.deepspeed_config=ds_configs/zero2.json", "dist.timeout_s=20",
                             "trainable.first_k_layers=2"])
run_erase(cfg, progress=False, should_stop=should_stop)
