"""Data pipeline throughput: shard reading per process, and the visual filter on the tiny teacher.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--pairs 20000] [--tokens 576] [--vf-pairs 16]

Prints:
- shard write rate, and read rate (pairs/s) of one process, shuffled, with and without
  decoding the stored surrogate tokens (project goal: >= 20k pairs/s per process);
- the same read through a DataLoader with 2 workers (the rank's whole stream);
- visual-filter throughput (pairs/s) with the tiny Janus preset (random weights) as
  teacher: a trivial callable classifier (rollout + decode cost), and NudeNet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_pairs(n: int, tokens: int):
    from ear_dist.data.pairs import PromptPair

    rng = np.random.default_rng(0)
    places = ["on a hill", "in the snow", "by a lake", "at dusk", "in a city square", "in fog"]
    for i in range(n):
        place = places[i % len(places)]
        pair = PromptPair(f"a photo of a church {place}, number {i}", f"a photo of a barn {place}, number {i}",
                          "church", "barn", source="bench", seed=i)
        if tokens:
            pair.surrogate_tokens = rng.integers(0, 16384, tokens).tolist()
        yield pair


def bench_shards(n: int, tokens: int, workdir: Path) -> None:
    from ear_dist.data.shards import ShardDataset, ShardLoader, ShardWriter

    out = workdir / "shards"
    t0 = time.perf_counter()
    with ShardWriter(out, max_samples_per_shard=5000) as writer:
        for pair in make_pairs(n, tokens):
            writer.write(pair)
    index = writer.close()
    write_s = time.perf_counter() - t0
    size_mb = sum(s["bytes"] for s in index["shards"]) / 2**20
    print(f"write: {n} pairs ({tokens} tokens each) in {len(index['shards'])} shards, {size_mb:.0f} MiB: "
          f"{n / write_s:,.0f} pairs/s")

    for decode_tokens in (True, False):
        ds = ShardDataset(out, shuffle=True, shuffle_buffer=1000, seed=0, decode_tokens=decode_tokens)
        t0, c0 = time.perf_counter(), time.process_time()
        count = sum(1 for _ in ds)
        read_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        assert count == n
        what = "with tokens" if decode_tokens else "json only  "
        print(f"read, 1 process, shuffled, {what}: {count / read_s:,.0f} pairs/s wall, "
              f"{count / cpu_s:,.0f} pairs per CPU-second (goal >= 20,000)")

    ds = ShardDataset(out, shuffle=True, shuffle_buffer=1000, seed=0, block_size=64)
    t0 = time.perf_counter()
    count, first_batch_at = 0, None
    for batch in ShardLoader(ds, num_workers=2):
        if first_batch_at is None:
            first_batch_at, first_len = time.perf_counter(), len(batch)
        count += len(batch)
    end = time.perf_counter()
    assert count == n
    steady = (count - first_len) / (end - first_batch_at)
    print(f"read, DataLoader 2 workers, batches of 64, with tokens: {count / (end - t0):,.0f} pairs/s overall, "
          f"{steady:,.0f} pairs/s after the first batch (worker start-up {first_batch_at - t0:.2f} s; "
          "2 workers + the main process share this machine's cores)")


def bench_vf(n: int) -> None:
    import torch

    from ear_dist.data.vf import CallableClassifier, VisualFilter, build_classifier, teacher_functions
    from ear_dist.models.janus import load_janus

    bundle = load_janus("tiny", device="cpu", dtype="float32")
    generate, decode = teacher_functions(bundle, guidance_weight=5.0, batch_size=8)
    pairs = list(make_pairs(n, 0))
    print(f"visual filter, tiny Janus preset (random weights, {bundle.num_image_tokens} image tokens), "
          f"{n} pairs, batches of 8 pairs:")
    classifiers = [("callable (always yes for targets)", CallableClassifier(
        lambda images, concepts: [i < len(images) // 2 for i in range(len(images))]))]
    try:
        classifiers.append(("nudenet 3.4.2 (ONNX, CPU)", build_classifier("nudenet", threshold=0.6)))
    except Exception as e:  # reported, not fatal: the rollout figure stands alone
        print(f"  nudenet unavailable: {e}")
    for name, classifier in classifiers:
        vf = VisualFilter(generate, decode, classifier, batch_size=8)
        with torch.no_grad():
            vf.run(pairs[:8])  # warm-up
            t0 = time.perf_counter()
            vf = VisualFilter(generate, decode, classifier, batch_size=8)
            vf.run(pairs)
        elapsed = time.perf_counter() - t0
        print(f"  {name}: {n / elapsed:,.1f} pairs/s ({vf.report.summary()})")


def report_load() -> None:
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return
    print(f"machine: {os.cpu_count()} cores, load average {load1:.1f} at start (wall-clock rates fall when it exceeds the cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=576, help="surrogate tokens stored per pair")
    parser.add_argument("--vf-pairs", type=int, default=16)
    args = parser.parse_args()
    report_load()
    workdir = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        bench_shards(args.pairs, args.tokens, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.vf_pairs:
        bench_vf(args.vf_pairs)


if __name__ == "__main__":
    main()
