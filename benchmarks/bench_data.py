"""Data pipeline throughput: shard reading per process, and the visual filter on the tiny teacher.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--pairs 20000] [--tokens 576] [--vf-pairs 16] [--repeats 3]

Prints:
- shard write rate, and read rate (pairs/s) of one process, shuffled, with and without
  decoding the stored surrogate tokens (project goal: >= 20k pairs/s per process);
- the same read through a DataLoader with 2 workers (the rank's whole stream);
- visual-filter throughput (pairs/s) with the tiny Janus preset (random weights) as
  teacher: a trivial callable classifier (rollout + decode cost), and NudeNet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Stat, run_header  # noqa: E402


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


def bench_shards(n: int, tokens: int, workdir: Path) -> dict:
    """One round of shard writing and reading; pairs/s per figure."""
    from ear_dist.data.shards import ShardDataset, ShardLoader, ShardWriter

    out = workdir / "shards"
    shutil.rmtree(out, ignore_errors=True)
    rates = {}
    t0 = time.perf_counter()
    with ShardWriter(out, max_samples_per_shard=5000) as writer:
        for pair in make_pairs(n, tokens):
            writer.write(pair)
    writer.close()
    rates["write"] = n / (time.perf_counter() - t0)
    for decode_tokens in (True, False):
        ds = ShardDataset(out, shuffle=True, shuffle_buffer=1000, seed=0, decode_tokens=decode_tokens)
        t0, c0 = time.perf_counter(), time.process_time()
        count = sum(1 for _ in ds)
        read_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        assert count == n
        what = "with tokens" if decode_tokens else "json only"
        rates[f"read, 1 process, shuffled, {what}, wall"] = count / read_s
        rates[f"read, 1 process, shuffled, {what}, per CPU-second"] = count / cpu_s
    ds = ShardDataset(out, shuffle=True, shuffle_buffer=1000, seed=0, block_size=64)
    t0 = time.perf_counter()
    count, first_batch_at = 0, None
    for batch in ShardLoader(ds, num_workers=2):
        if first_batch_at is None:
            first_batch_at, first_len = time.perf_counter(), len(batch)
        count += len(batch)
    end = time.perf_counter()
    assert count == n
    rates["read, DataLoader 2 workers, batches of 64, overall"] = count / (end - t0)
    rates["read, DataLoader 2 workers, after the first batch"] = (count - first_len) / (end - first_batch_at)
    return rates


def vf_filters(n: int):
    """The visual filter's teacher (tiny Janus preset) and its classifiers: a trivial callable, and NudeNet."""
    from ear_dist.data.vf import CallableClassifier, build_classifier, teacher_functions
    from ear_dist.models.janus import load_janus

    bundle = load_janus("tiny", device="cpu", dtype="float32")
    generate, decode = teacher_functions(bundle, guidance_weight=5.0, batch_size=8)
    classifiers = [("callable (always yes for targets)", CallableClassifier(
        lambda images, concepts: [i < len(images) // 2 for i in range(len(images))]))]
    try:
        classifiers.append(("nudenet 3.4.2 (ONNX, CPU)", build_classifier("nudenet", threshold=0.6)))
    except Exception as e:  # reported, not fatal: the rollout figure stands alone
        print(f"  nudenet unavailable: {e}")
    return bundle, generate, decode, classifiers


def bench_vf(n: int, generate, decode, classifiers) -> dict:
    """One round of the visual filter over ``n`` pairs with each classifier; pairs/s."""
    import torch

    from ear_dist.data.vf import VisualFilter

    pairs = list(make_pairs(n, 0))
    rates = {}
    for name, classifier in classifiers:
        vf = VisualFilter(generate, decode, classifier, batch_size=8)
        with torch.no_grad():
            vf.run(pairs[:8])  # warm-up
            t0 = time.perf_counter()
            vf = VisualFilter(generate, decode, classifier, batch_size=8)
            vf.run(pairs)
        rates[f"visual filter, {name}"] = n / (time.perf_counter() - t0)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=576, help="surrogate tokens stored per pair")
    parser.add_argument("--vf-pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("\n".join(run_header("bench_data")))
    rates: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        vf = vf_filters(args.vf_pairs) if args.vf_pairs else None
        for _ in range(args.repeats):
            for name, rate in bench_shards(args.pairs, args.tokens, workdir).items():
                rates.setdefault(name, []).append(rate)
            if vf is not None:
                for name, rate in bench_vf(args.vf_pairs, *vf[1:]).items():
                    rates.setdefault(name, []).append(rate)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.pairs} pairs ({args.tokens} tokens each) through shards of 5000; visual filter on {args.vf_pairs} "
          f"pairs, tiny Janus preset (random weights), batches of 8; pairs/s, median (min-max) of {args.repeats} "
          "repeats; goal for reading: >= 20,000 pairs/s per process")
    for name, values in rates.items():
        stat = Stat.of(values)
        print(f"  {name}: {stat.fmt(',.0f' if stat.median >= 100 else '.2f')}")
    print("  (the DataLoader's 2 workers and the main process share this machine's cores)")


if __name__ == "__main__":
    main()
