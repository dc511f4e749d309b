"""Eval throughput: images/s of `ear-dist eval` end to end, batched vs one prompt per rollout, and a resumed run.

Runs the real ``run_eval`` (load, generate, judge, report) three times in one process on
the same prompts: with ``--batch`` prompts per rollout, with 1, and again into the first
output directory (every image already there: what a resumed job pays). Prints images/s
and the ratios, measured in this one run.

    python benchmarks/bench_eval.py --prompts 32 --batch 8                      # tiny model, CPU
    python benchmarks/bench_eval.py --model /models/Janus-Pro-7B --device cuda --dtype bfloat16 \\
        --coco coco_30k.csv --prompts 1000 --batch 32 --skip-unbatched          # the GPU procedure (README)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ear_dist.config import load_config
from ear_dist.eval.evaluate import run_eval


def prompts_suite(directory: Path, coco: str, n: int) -> Path:
    """A suite of ``n`` captions (from a COCO CSV, or made up) judged by their token histogram only."""
    if coco:
        from ear_dist.data.readers import read_pairs

        prompts = [p.target for p in read_pairs(coco, format="coco")[:n]]
    else:
        things = ["church", "barn", "castle", "windmill", "boat", "dog", "tree", "bridge"]
        places = ["at night", "in a field", "by the sea", "in snow", "in the city"]
        prompts = [f"a photo of a {things[i % len(things)]} {places[(i // len(things)) % len(places)]} number {i}"
                   for i in range(n)]
    path = directory / "bench_suite.json"
    path.write_text(json.dumps({"name": "bench", "unrelated": prompts}))
    return path


def timed_eval(cfg, suite: Path, out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    report = run_eval(cfg, [str(suite)], [], out, progress=False, log=lambda *_: None)
    return time.perf_counter() - t0, report["generation"]["base"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="a Janus directory; default: a tiny random one built here")
    ap.add_argument("--grid", type=int, default=8, help="tiny model: image tokens per side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--coco", default="", help="COCO-30k caption CSV (default: made-up prompts)")
    ap.add_argument("--skip-unbatched", action="store_true", help="do not time batch 1 (slow on a 7B model)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if not model:
            from ear_dist.models.janus import save_tiny_checkpoint

            model = str(save_tiny_checkpoint(tmp / "tiny", seed=0, grid_side=args.grid))
        suite = prompts_suite(tmp, args.coco, args.prompts)
        sets = [f"model.path={model}", f"model.device={args.device}", f"model.dtype={args.dtype}"]
        rows = []
        seconds, gen = timed_eval(load_config(overrides=sets + [f"eval.batch_size={args.batch}"]), suite,
                                  tmp / "batched")
        rows.append((f"batch {args.batch}", seconds, gen))
        if not args.skip_unbatched:
            seconds, gen = timed_eval(load_config(overrides=sets + ["eval.batch_size=1"]), suite, tmp / "single")
            rows.append(("batch 1", seconds, gen))
        seconds, gen = timed_eval(load_config(overrides=sets + [f"eval.batch_size={args.batch}"]), suite,
                                  tmp / "batched")
        rows.append(("resumed (all images on disk)", seconds, gen))
    print(f"eval end to end (load, generate, judge, report): {args.prompts} prompts, model {args.model or 'tiny'}, "
          f"device {args.device}, {args.dtype}")
    print(f"{'run':32s} {'seconds':>8s} {'generated':>9s} {'reused':>7s} {'images/s':>9s}")
    for name, seconds, gen in rows:
        print(f"{name:32s} {seconds:8.2f} {gen['generated']:9d} {gen['reused']:7d} {args.prompts / seconds:9.2f}")
    if not args.skip_unbatched:
        print(f"batched vs batch 1: {rows[1][1] / rows[0][1]:.2f}x")
    print(f"fresh vs resumed run: {rows[0][1] / rows[-1][1]:.2f}x")


if __name__ == "__main__":
    main()
