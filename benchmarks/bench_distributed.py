"""Distributed layouts on 2 ranks, one run: ZeRO-2 vs ZeRO-3 (step time, bytes moved per step) and
dedicated vs colocated teacher (pairs/s), then a weak-scaling projection from the measured volumes.

    python benchmarks/bench_distributed.py --steps 6 --repeats 3
    python benchmarks/bench_distributed.py --project-only          # the 64-GPU projection alone

Each layout is a real `torchrun --nproc_per_node=2 -m ear_dist erase` run (gloo on CPU),
run ``--repeats`` times interleaved with the others; times and ratios are the median
(min-max) over the repeats. Bytes come from DeepSpeed's comms logger (dist.log_comms=true),
per rank per step (the same in every repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Stat, ratio_stat, run_header  # noqa: E402

PAIRS = [{"original_prompt": f"a {a} church {s}", "modified_prompt": f"a {a} {o} {s}", "concept": "church"}
         for a, o, s in [("red", "barn", "in snow"), ("old", "castle", "at night"), ("small", "windmill", "by the sea"),
                         ("tall", "lighthouse", "in a field")]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(name: str, work: Path, model: Path, pairs: Path, steps: int, extra: list[str]) -> dict:
    out = work / name
    sets = ["train.resume=never", f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}",
            f"train.steps={steps}", "train.pairs_per_step=2", "erase.window_len=16", "erase.update_mode=sequence",
            "dist.log_comms=true", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ear_dist", "erase", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def project(trainable: int, total: int, bytes_per_param: int, compute_s: float, bus_gbps: float,
            gpus=(8, 16, 32, 64)) -> list[tuple]:
    """Weak scaling: fixed work per GPU; ring collectives move 2(N-1)/N x the payload over the slowest link.

    ZeRO-2 per step: reduce-scatter of the trainable gradients + all-gather of the
    updated trainable shards. ZeRO-3 adds an all-gather of every parameter for the
    forward and again for the backward (gradients flow back through frozen layers to
    reach the trained first layers). Efficiency = compute / (compute + exposed comm),
    with no overlap assumed (a lower bound: ZeRO-2 overlaps its reduce with backward).
    """
    rows = []
    link = bus_gbps * 1e9 / 8
    for n in gpus:
        per_pass = (n - 1) / n  # a ring reduce-scatter or all-gather moves (N-1)/N of the payload per rank
        z2 = 2 * per_pass * trainable * bytes_per_param / link
        z3 = z2 + 2 * per_pass * total * bytes_per_param / link
        rows.append((n, z2, compute_s / (compute_s + z2), z3, compute_s / (compute_s + z3)))
    return rows


def print_projection(args) -> None:
    from ear_dist.config import TrainableConfig
    from ear_dist.models.janus import build_preset
    from ear_dist.telemetry.flops import (executed_train_flops_per_token, frozen_forward_flops_per_token,
                                          janus_flops_shape)
    from ear_dist.train.trainable import select_trainable_names

    b = build_preset("janus-pro-7b", meta=True)
    names = set(select_trainable_names(b.model, TrainableConfig(first_k_layers=5, modules=args.modules)))
    trainable = sum(p.numel() for n, p in b.model.named_parameters() if n in names)
    total = sum(p.numel() for p in b.model.parameters())
    seq = 576 + 24  # image tokens + a typical prompt
    shape = janus_flops_shape(b.model.config)
    # what the partly frozen student executes (backward stops at layer 0 but runs through all
    # layers above it) plus the teacher's two teacher-forced passes
    flops = seq * (executed_train_flops_per_token(shape, seq, trainable, 0)
                   + 2 * frozen_forward_flops_per_token(shape, seq))
    # a CFG rollout is memory-bound: every decode step reads all weights once (bf16)
    rollout_s = 576 * 2 * total / (args.hbm_tbps * 1e12)
    print(f"\nProjection, Janus-Pro-7B, first 5 layers ({args.modules}) trainable: {trainable / 1e6:.0f}M of "
          f"{total / 1e9:.2f}B params, bf16. Per pair: {flops / 1e12:.1f} TFLOP (student executed fwd+bwd + "
          f"teacher 2 x (2N+4Lhs)) at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s (assumed) = "
          f"{flops / (args.peak_tflops * 1e12 * args.mfu) * 1e3:.0f} ms; a 576-token CFG rollout reads the weights "
          f"576 times at {args.hbm_tbps} TB/s = {rollout_s * 1e3:.0f} ms. Links {args.bus_gbps:.0f} Gb/s per GPU, "
          f"no comm/compute overlap assumed (lower bound).")
    for label, pairs, with_rollout in (("stored rollouts, 1 pair/GPU", 1, False),
                                       ("stored rollouts, 8 pairs/GPU", 8, False),
                                       ("rollout in step, 1 pair/GPU", 1, True)):
        compute_s = pairs * flops / (args.peak_tflops * 1e12 * args.mfu) + (rollout_s if with_rollout else 0.0)
        print(f"  {label}: compute {compute_s * 1e3:.0f} ms/step")
        print(f"  {'GPUs':>7} {'ZeRO-2 comm ms':>15} {'efficiency':>11} {'ZeRO-3 comm ms':>15} {'efficiency':>11}")
        for n, z2, e2, z3, e3 in project(trainable, total, 2, compute_s, args.bus_gbps):
            print(f"  {n:>7} {z2 * 1e3:>15.1f} {e2:>11.1%} {z3 * 1e3:>15.1f} {e3:>11.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--project-only", action="store_true")
    ap.add_argument("--modules", default="attention", choices=["attention", "all"])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed achieved fraction of peak")
    ap.add_argument("--bus-gbps", type=float, default=400.0, help="per-GPU inter-node link (NDR InfiniBand)")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="GPU memory bandwidth (H100 SXM)")
    args = ap.parse_args()
    print("\n".join(run_header("bench_distributed")))
    if not args.project_only:
        from ear_dist.models.janus import save_tiny_checkpoint

        layouts = {
            "zero2 colocated": ["dist.deepspeed_config=ds_configs/zero2.json"],
            "zero3 colocated": ["dist.deepspeed_config=ds_configs/zero3.json"],
            "dedicated 1T+1S": ["dist.teacher_placement=dedicated", "dist.deepspeed_config=ds_configs/zero2.json"],
        }
        res: dict = {k: [] for k in layouts}
        with tempfile.TemporaryDirectory() as d:
            work = Path(d)
            model = save_tiny_checkpoint(work / "model", seed=0, grid_side=8, codebook_size=256)
            pairs = work / "pairs.json"
            pairs.write_text(json.dumps(PAIRS))
            for r in range(args.repeats):  # interleaved: machine noise hits every layout alike
                for k, v in layouts.items():
                    res[k].append(run_layout(f"{k.split()[0]}{k.split()[1]}-{r}", work, model, pairs, args.steps, v))
        print(f"2 CPU ranks (gloo), tiny Janus 8x8 tokens, {args.steps} steps, 2 pairs per step; median (min-max) "
              f"of {args.repeats} repeats")
        t = {k: [s["seconds"] / s["steps"] for s in runs] for k, runs in res.items()}
        print(f"{'layout':<18}{'s/step':>26}{'pairs/s':>26}{'student ranks':>14}{'comm KB/step/rank':>19}")
        for k, runs in res.items():
            s = runs[0]
            comm = sum(s.get("comm_bytes_per_step", {}).values()) / 1024
            pairs_s = Stat.of([2 / x for x in t[k]])
            print(f"{k:<18}{Stat.of(t[k]).fmt('.3f'):>26}{pairs_s.fmt('.2f'):>26}{s['student_ranks']:>14}"
                  f"{comm:>19.1f}")
            for op, b in sorted(s.get("comm_bytes_per_step", {}).items()):
                if b:
                    print(f"{'':<20}{op}: {b / 1024:.1f} KB")
        c = {k: sum(runs[0].get("comm_bytes_per_step", {}).values()) for k, runs in res.items()}
        print(f"ZeRO-3 / ZeRO-2: step time {ratio_stat(t['zero3 colocated'], t['zero2 colocated']).fmt('.2f', 'x')}, "
              f"bytes per step {c['zero3 colocated'] / max(c['zero2 colocated'], 1):.1f}x")
        print(f"dedicated (1 teacher + 1 student) / colocated (2 students) pairs/s: "
              f"{ratio_stat(t['zero2 colocated'], t['dedicated 1T+1S']).fmt('.2f', 'x')}")
    print_projection(args)


if __name__ == "__main__":
    main()
