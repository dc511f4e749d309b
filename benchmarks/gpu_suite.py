"""The GPU suite: every GPU goal of the project, measured by one command within minutes.

    python benchmarks/gpu_suite.py --out runs/gpu_suite            # one H100/H200: 7B shape, bf16, within 8 min
    OMP_NUM_THREADS=1 python benchmarks/gpu_suite.py --smoke --out runs/gpu_smoke   # CPU, small model (CI)

One model is built and shared by every part: the Janus-Pro-7B shape with random weights
in bf16, built on the GPU (random initialisation of 7B parameters on a CPU alone takes
minutes). The parts, in order (the three throughput goals first, so that a run cut short
keeps them); each records its time, the device's peak memory, what it left allocated
(the lean decoder's KV cache and the part's students are freed after every part) and
NVML's power, energy and memory while it ran:

- headline: the time to erase one concept end to end at the paper's settings: 50
  prompt pairs, their 576-token CFG rollouts (one batch of 50), then 50 steps of one pair
  with per-window updates (windows of 48), Adam lr 1e-4, attention of the first 5 layers;
  up to 3 repeats within 170 s, a fresh student each time (goal: <= 45 s).
- many: 20 concepts' pairs in one joint run, each step one pair of every concept, so each
  window update (from the cached prefix) trains all 20 rows at once; 3 steps measured and
  projected linearly to 50 pairs per concept (goal: <= 30 s per concept).
- eval: images/s of 576-token CFG samples at the batch the eval planner
  (``ear_dist.eval.batching``) fits in 70% of the free memory, with and without the VQ decode
  to pixels, against the memory-bandwidth bound of a decode step (weights + mean KV cache
  bytes over a bandwidth measured by a device copy) (goal: >= 10 images/s per GPU).
- rollout: image tokens/s of our eager CFG loop, the lean decode path (the static-cache
  step captured as a CUDA graph) and transformers' ``generate(generation_mode="image")``,
  same batch, greedy; the tokens of every loop are compared with the eager loop's.
- step: the erasure step (stored rollouts: sequence updates, per-window updates exact and
  from the cached prefix; and sequence updates with the CFG rollout inside) against the
  official loop's compute pattern and a KV-cached per-token loop. Those two are timed
  over their first window and scaled to every token: their per-token cost is flat or
  grows with the cache, so the scaled figure never overstates our speed-up.
- mfu: ``ear-dist bench``'s instruments on the same model: the student's forward +
  backward MFU under the 6N convention and from the FLOPs the partial backward executes.
- loss: the fused windowed loss against the eager reference and its torch.compile, T=576,
  V=16384, B in 1, 4, 16: time and peak extra memory.
- exact: the lean path's greedy tokens against the eager loop's at the 7B shape in float32
  with TF32 off, 4 rows, one untimed call each (its own model, after the 7B one is freed).
  The rollout part's bf16 comparison cannot tell a bug from rounding: random weights leave
  near-ties between codes, so one rounding difference changes a token and every later one.
- var: the VAR family's erasure step at the Infinity-2B shape (random weights, bf16, 13
  scales = 10,521 positions, batch 1, the first 2 blocks' attention trained): EAR with
  stored rollouts and with the CFG rollout inside, S-VARE, against a per-scale loop with KV
  caches computing the same loss (checked equal). It builds its own model (on the CPU,
  then moved), after the 7B one is freed.

``gpu_suite.json`` is written before the first part (every part "not run" and why) and
rewritten after every part (under a temp name, then renamed), so a run cut short keeps
what it measured and says which parts did not run; SIGTERM (``timeout``) records the part
it stopped in. A part that would end after ``--time-limit-s`` (its H100 time in
``EXPECTED_S``) is skipped and reported; ``gpu_suite.md`` holds the table of figures against
the goals. ``--smoke`` runs every part on the CPU at a small size (the lean path then runs
its graph's step as is, the Triton kernels under the interpreter): what CI runs so the
suite never breaks unseen; its figures are not the goals' figures. The exit code is 1 if a
part failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Stat, command_line, machine_line, rate_stat, ratio_stat  # noqa: E402

# the three throughput goals first: a run cut short by --time-limit-s keeps them
PARTS = ("headline", "many", "eval", "rollout", "step", "mfu", "loss", "exact", "var")
OWN_MODEL = ("exact", "var")  # parts that build their own model, after the shared one is freed
GOALS = {
    "step_vs_official": 100.0, "step_vs_kv_loop": 5.0, "loss_vs_eager": 2.0, "loss_vs_compile": 1.3,
    "loss_memory_share": 0.25, "student_mfu": 0.45, "rollout_vs_generate": 3.0, "headline_s": 45.0,
    "many_s_per_concept": 30.0, "eval_images_per_s": 10.0,
}
PAPER_PAIRS = 50  # pairs (and steps of one pair) per concept at the paper's settings
# seconds each part took on an H100 (results/gpu-h100-2026-11-27.md; the new parts estimated): a part that would
# end after --time-limit-s is skipped and reported as such, so that the command stays within its minutes
EXPECTED_S = {"headline": 200, "many": 40, "eval": 50, "rollout": 60, "step": 45, "mfu": 30, "loss": 20, "exact": 40,
              "var": 90}


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: the GPU's (``FULL``) or CI's (``SMOKE``)."""

    model: str
    grid_side: Optional[int]  # a tiny config with this grid (smoke); None: the preset's own shape
    dtype: torch.dtype
    lean: str  # the lean decode mode timed
    rollout_batch: int
    rollout_repeats: int
    rollout_warmup_tokens: Optional[int]
    window_len: int
    step_repeats: int
    headline_pairs: int
    headline_rollout_batch: int
    headline_prefixes: tuple  # erase.window_prefix values timed
    headline_repeats: int  # at most; fewer where the next repeat would pass headline_budget_s
    headline_budget_s: float
    many_concepts: int
    many_pairs_per_concept: int  # measured; projected to PAPER_PAIRS
    many_rollout_batch: int
    eval_batch_cap: int  # eval.batch_size: the most prompts per sampling batch
    eval_kv_gib: float  # eval.kv_cache_gib (0 on a GPU: 70% of the free memory)
    eval_repeats: int
    mfu_pairs: int
    mfu_steps: int
    loss_batches: tuple
    loss_tokens: int
    loss_vocab: int
    loss_repeats: int
    var_preset: str  # the VAR family's step: its preset (the 2B shape on a GPU)
    var_batch: int
    var_repeats: int
    exact_batch: int  # rows of the float32 lean-vs-eager token check


FULL = Scale("janus-pro-7b", None, torch.bfloat16, "cuda_graph", rollout_batch=16, rollout_repeats=1,
             rollout_warmup_tokens=8, window_len=48, step_repeats=2, headline_pairs=50, headline_rollout_batch=50,
             headline_prefixes=("recompute",), headline_repeats=3, headline_budget_s=170.0, many_concepts=20,
             many_pairs_per_concept=3, many_rollout_batch=60, eval_batch_cap=256, eval_kv_gib=0.0, eval_repeats=3,
             mfu_pairs=8, mfu_steps=2, loss_batches=(1, 4, 16), loss_tokens=576, loss_vocab=16384, loss_repeats=5,
             var_preset="infinity-2b", var_batch=1, var_repeats=2, exact_batch=4)
SMOKE = Scale("tiny", 8, torch.float32, "uncaptured", rollout_batch=2, rollout_repeats=2, rollout_warmup_tokens=None,
              window_len=16, step_repeats=2, headline_pairs=4, headline_rollout_batch=4,
              headline_prefixes=("recompute", "cached"), headline_repeats=2, headline_budget_s=60.0, many_concepts=3,
              many_pairs_per_concept=2, many_rollout_batch=6, eval_batch_cap=8, eval_kv_gib=0.002, eval_repeats=2,
              mfu_pairs=2, mfu_steps=1,
              loss_batches=(1,), loss_tokens=48, loss_vocab=128, loss_repeats=2,
              var_preset="tiny-var", var_batch=2, var_repeats=1, exact_batch=2)


def build_model(scale: Scale, device: torch.device):
    """The suite's one model, built on ``device`` (random weights, seeded), prompts as ids if it has no tokenizer."""
    from ear_dist.bench.erase import with_prompt_ids
    from ear_dist.models.janus import build_preset
    from ear_dist.models.janus.presets import tiny_config

    config = tiny_config(grid_side=scale.grid_side, codebook_size=256) if scale.grid_side else None
    with torch.device(device):  # construct on the device: initialising 7B parameters on a CPU takes minutes
        bundle = build_preset(scale.model, seed=0, device=device, dtype=scale.dtype, config=config)
    return with_prompt_ids(bundle)


# --------------------------------------------------------------------------- the parts


def part_rollout(bundle, scale: Scale) -> dict:
    from benchmarks.bench_rollout import EAGER, GENERATE, measure_rollouts, prompt_ids

    ids, mask = prompt_ids(bundle, scale.rollout_batch)
    bench = measure_rollouts(bundle, ids, mask, 5.0, scale.lean, scale.rollout_repeats,
                             warmup_tokens=scale.rollout_warmup_tokens)
    lean = f"ours, lean ({scale.lean})"
    out = {"batch": scale.rollout_batch, "image_tokens_per_batch": bench.image_tokens, "failed": bench.failed,
           "image_tokens_per_s": {k: bench.rate(k).as_dict() for k in bench.times}}
    for loop in (lean, GENERATE):
        out[f"same_tokens_as_eager: {loop}"] = bench.same_tokens(loop)
        out[f"token_agreement_with_eager: {loop}"] = bench.agreement(loop)
    for loop in (lean, EAGER):
        ratio = bench.ratio(loop)
        out[f"{loop} / generate"] = ratio.as_dict() if ratio is not None else None
    out["lean_vs_eager"] = bench.ratio(lean, EAGER).as_dict() if lean in bench.times else None
    return out


def part_step(bundle, scale: Scale, decode: str) -> dict:
    from benchmarks.bench_erase_step import KV_LOOP, OFFICIAL, speedups, step_bench, time_runs
    from benchmarks.bench_rollout import sync_of

    bench = step_bench(bundle, scale.window_len, modes=("sequence", "window", "window-cached"), decode=decode,
                       baseline_tokens=scale.window_len)
    times = time_runs(bench.runs, scale.step_repeats, sync_of(bundle.device))
    return {
        "window_len": scale.window_len, "pairs": 2, "image_tokens": bundle.num_image_tokens,
        "baseline_tokens_timed": scale.window_len, "decode_in_step": decode,
        "ms_per_call": {k: Stat.of(v).scaled(1e3).as_dict() for k, v in times.items()},
        "supervised_tokens_per_s": {k: rate_stat(v, bench.tokens[k]).as_dict() for k, v in times.items()},
        "speedups": {ours: {"vs_official": r[OFFICIAL].as_dict(), "vs_kv_loop": r[KV_LOOP].as_dict()}
                     for ours, r in speedups(bench, times).items()},
        "official_s_per_pair_token": Stat.of([t / bench.tokens[OFFICIAL] for t in times[OFFICIAL]]).as_dict(),
    }


def _erase_run(bundle, pairs, cfg, rollout_batch: int, decode: str, sync) -> dict:
    """One erasure end to end: the pairs' CFG rollouts in batches, then one step per ``pairs.step_batches`` entry
    (per-window updates over every pair of the step at once) of the trainer's own job (``build_job``: a fresh
    student and optimizer, float32 master weights for a bfloat16 model as ``ear-dist erase`` trains it)."""
    from ear_dist.bench.erase import bench_stream
    from ear_dist.data.stream import PairBatch
    from ear_dist.distributed.runtime import init_runtime
    from ear_dist.models.janus.decode import release_decoders
    from ear_dist.models.janus.rollout import rollout
    from ear_dist.train.job import build_job

    prompts, seeds, steps = pairs
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens = rollout(bundle, [p for _, p, _ in prompts], seeds=seeds, batch_size=rollout_batch, decode=decode)
    release_decoders(bundle.model)  # the rollout batch's static KV cache is not kept through training
    sync()
    t_rollout = time.perf_counter() - t0
    job = build_job(cfg, init_runtime(cfg), bundle, bench_stream("church", 1, len(steps)), teacher_steps=len(steps))
    kept = updates = 0
    for rows in steps:
        batch = PairBatch([prompts[i][0] for i in rows], [prompts[i][1] for i in rows], [prompts[i][2] for i in rows],
                          [seeds[i] for i in rows], tokens[rows])
        result = job.step(batch)
        kept, updates = kept + result.windows_kept, updates + result.optimizer_steps
    sync()
    total = time.perf_counter() - t0
    del job
    return {"total_s": total, "rollouts_s": t_rollout, "training_s": total - t_rollout, "windows_kept": kept,
            "window_updates": updates}


def _run_stats(runs: list[dict]) -> dict:
    out = {k: Stat.of([r[k] for r in runs]).as_dict() for k in ("total_s", "rollouts_s", "training_s")}
    return {**out, "windows_kept": runs[0]["windows_kept"], "window_updates": runs[0]["window_updates"],
            "repeats": len(runs)}


def _erase_setup(bundle, scale: Scale, decode: str, prefix: str):
    """The paper's settings as the config ``ear-dist erase`` would resolve: attention of the first 5 layers, Adam
    1e-4, per-window updates with the given prefix."""
    from ear_dist.config import load_config

    return load_config(overrides=[
        f"model.path={scale.model}", f"model.device={bundle.device}", "trainable.first_k_layers=5",
        "trainable.modules=attention", "optim.lr=1e-4", "erase.update_mode=window", f"erase.window_prefix={prefix}",
        f"erase.window_len={scale.window_len}", f"rollout.decode={decode}", "train.tensorboard=false"])


def part_headline(bundle, scale: Scale, decode: str) -> dict:
    """Erase one concept at the paper's settings: the pairs' CFG rollouts in batches, then one step per pair with
    window updates; repeated (up to ``headline_repeats``, within ``headline_budget_s``), a fresh student each time."""
    from benchmarks.bench_rollout import sync_of
    from ear_dist.bench.erase import bench_pairs

    sync = sync_of(bundle.device)
    batch = bench_pairs("church", scale.headline_pairs, 0)
    prompts = list(zip(batch.target_prompts, batch.surrogate_prompts, batch.concepts))
    pairs = (prompts, list(batch.seeds), [[i] for i in range(len(prompts))])
    out = {"pairs": scale.headline_pairs, "steps": scale.headline_pairs, "pairs_per_step": 1,
           "window_len": scale.window_len, "rollout_batch": scale.headline_rollout_batch, "decode": decode,
           "repeats_planned": scale.headline_repeats, "budget_s": scale.headline_budget_s}
    t_part = time.perf_counter()
    for prefix in scale.headline_prefixes:
        cfg = _erase_setup(bundle, scale, decode, prefix)
        runs = []
        while len(runs) < scale.headline_repeats:
            runs.append(_erase_run(bundle, pairs, cfg, scale.headline_rollout_batch, decode, sync))
            if time.perf_counter() - t_part + runs[-1]["total_s"] > scale.headline_budget_s:
                break
        out[prefix] = _run_stats(runs)
    return out


def part_many(bundle, scale: Scale, decode: str) -> dict:
    """Many concepts on one GPU: ``many_concepts`` concepts' pairs in one joint run, every step one pair of each
    concept (so each window update trains all of them at once, B = concepts), ``many_pairs_per_concept`` steps.

    Every step and every rollout batch does the same work, so the time of the paper's PAPER_PAIRS pairs per concept
    is projected linearly from the measured run (rollouts per prompt, training per step); both are recorded.
    """
    from benchmarks.bench_rollout import sync_of
    from ear_dist.bench.erase import bench_pairs

    sync = sync_of(bundle.device)
    n, k = scale.many_concepts, scale.many_pairs_per_concept
    prompts, seeds, steps = [], [], []
    for s in range(k):
        rows = []
        for c in range(n):
            one = bench_pairs(f"concept{c:02d}", 1, s)
            rows.append(len(prompts))
            prompts.append((one.target_prompts[0], one.surrogate_prompts[0], one.concepts[0]))
            seeds.append(s * n + c)
        steps.append(rows)
    # window updates over all concepts' rows from the cached prefix: recomputing the prefix of 20 rows would keep
    # every layer's activations of 20 x 600 tokens for the backward (over an H100's memory at the 7B shape)
    cfg = _erase_setup(bundle, scale, decode, "cached")
    run = _erase_run(bundle, (prompts, seeds, steps), cfg, scale.many_rollout_batch, decode, sync)
    per_prompt, per_step = run["rollouts_s"] / len(prompts), run["training_s"] / k
    projected = per_prompt * n * PAPER_PAIRS + per_step * PAPER_PAIRS
    return {"concepts": n, "pairs_per_concept_measured": k, "pairs_per_step": n, "steps_measured": k,
            "window_prefix": "cached",
            "rollout_batch": scale.many_rollout_batch, "decode": decode, "measured": run,
            "projection": f"rollouts_s / {len(prompts)} prompts x {n * PAPER_PAIRS} + training_s / {k} steps x "
                          f"{PAPER_PAIRS} (linear: every step and rollout batch does the same work)",
            "projected_pairs_per_concept": PAPER_PAIRS, "projected_total_s": projected,
            "projected_gpu_minutes": projected / 60, "projected_s_per_concept": projected / n}


def _bandwidth_gb_s(device: torch.device) -> Optional[float]:
    """Device memory bandwidth measured by copying a 1 GiB buffer (bytes read + written per second); None on a CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / 10
    del src, dst
    return 2 * 2**30 / seconds / 1e9


def part_eval(bundle, scale: Scale, decode: str) -> dict:
    """Evaluation throughput: 576-token CFG samples (and their VQ decode to pixels) at the batch the eval planner
    picks from the free memory, against the memory-bandwidth bound of a decode step.

    Each decode step reads the decoder's weights once for the whole batch and every row's KV cache; at the 7B shape
    that traffic, not the FLOPs, bounds a step: bound = batch / (tokens x (weight bytes + mean KV bytes) / bandwidth).
    """
    from benchmarks.bench_rollout import prompt_ids, sync_of
    from ear_dist.eval.batching import KvBudget, kv_bytes_per_prompt
    from ear_dist.models.janus.decode import release_decoders
    from ear_dist.models.family import as_image_model
    from ear_dist.models.janus.rollout import rollout_ids

    device, sync = bundle.device, sync_of(bundle.device)
    release_decoders(bundle.model)  # an earlier part's static cache would hide free memory from the planner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ids, _ = prompt_ids(bundle, 1)
    prompt_len, tokens_per_image = ids.shape[1], bundle.num_image_tokens
    budget = KvBudget.of(device, scale.eval_kv_gib)
    per_prompt = kv_bytes_per_prompt(as_image_model(bundle), prompt_len, guided=True)
    batch = int(min(scale.eval_batch_cap, budget.bytes // per_prompt))
    if batch < 1:
        raise RuntimeError(f"the KV-cache budget ({budget.source}) holds no prompt of {per_prompt / 2**30:.2f} GiB")
    ids, mask = prompt_ids(bundle, batch)
    seeds = list(range(batch))

    def sample_batch():
        with torch.no_grad():
            return rollout_ids(bundle, ids, mask, 5.0, 1.0, 0, False, seeds, decode=decode)

    sync()
    t = time.perf_counter()
    tokens = sample_batch()  # first batch: the decoder's cache allocated, its step captured or compiled
    sync()
    first_s = time.perf_counter() - t
    sample_s, decode_s = [], []
    for _ in range(scale.eval_repeats):
        sync()
        t = time.perf_counter()
        tokens = sample_batch()
        sync()
        sample_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        as_image_model(bundle).decode(tokens)
        sync()
        decode_s.append(time.perf_counter() - t)
    del tokens
    inner = bundle.model.model  # what one decode step reads: the decoder and the image-token modules
    weights = sum(p.numel() * p.element_size() for name in ("language_model", "generation_embeddings",
                                                             "generation_aligner", "generation_head")
                  for p in getattr(inner, name).parameters())
    kv_per_position = 2 * batch * as_image_model(bundle).kv_bytes_per_token  # CFG: two rows per prompt
    kv_mean = kv_per_position * (prompt_len + tokens_per_image / 2)  # the positions filled, on average
    kv_full = kv_per_position * (prompt_len + tokens_per_image)  # a static cache's attention reads every position
    bandwidth = _bandwidth_gb_s(device)
    out = {"batch": batch, "cfg_rows": 2 * batch, "prompt_tokens": prompt_len, "image_tokens": tokens_per_image,
           "decode": decode, "kv_budget_gib": budget.bytes / 2**30, "kv_budget_source": budget.source,
           "kv_cache_gib": batch * per_prompt / 2**30, "first_batch_s": first_s,
           "images_per_s": rate_stat(sample_s, batch).as_dict(),
           "images_per_s_with_vq_decode": rate_stat([a + b for a, b in zip(sample_s, decode_s)], batch).as_dict(),
           "bytes_per_decode_step": {"weights": weights, "kv_cache_mean": kv_mean, "kv_cache_full": kv_full},
           "bandwidth_gb_s_measured": bandwidth}
    if bandwidth is not None:
        out.update(bandwidth_bound(batch, tokens_per_image, weights, kv_mean, kv_full, bandwidth))
        out["share_of_bound"] = out["images_per_s"]["median"] / out["bound_images_per_s"]
    release_decoders(bundle.model)
    return out


def bandwidth_bound(batch: int, tokens: int, weight_bytes: float, kv_mean_bytes: float, kv_full_bytes: float,
                    bandwidth_gb_s: float) -> dict:
    """Images/s if every decode step only moved its bytes at ``bandwidth_gb_s``: the weights once, plus the KV cache
    of the filled positions on average, or of every position (a static cache's attention reads them all)."""
    def bound(kv_bytes):
        return batch / (tokens * (weight_bytes + kv_bytes) / (bandwidth_gb_s * 1e9))

    return {"bound_images_per_s": bound(kv_mean_bytes), "bound_images_per_s_static_cache": bound(kv_full_bytes),
            "bound": "batch / (image tokens x (decoder weights + KV cache bytes per step) / the bandwidth measured by "
                     "a 1 GiB device copy); KV bytes: the filled positions on average (bound_images_per_s), or every "
                     "position of the static cache, which its attention reads each step "
                     "(bound_images_per_s_static_cache)"}


def part_mfu(bundle, scale: Scale, decode: str, log_dir: Path) -> dict:
    from ear_dist.bench.erase import run_erasure_bench
    from ear_dist.config import load_config

    cfg = load_config(overrides=[
        f"model.path={scale.model}", f"model.device={bundle.device}", f"train.pairs_per_step={scale.mfu_pairs}",
        "erase.update_mode=sequence", f"erase.window_len={scale.window_len}", f"rollout.decode={decode}",
        "train.tensorboard=false"])
    result = run_erasure_bench(cfg, steps=scale.mfu_steps, warmup=1, log_dir=log_dir, echo=print, bundle=bundle)
    print(result.summary())
    return {"pairs_per_step": scale.mfu_pairs, "steps": scale.mfu_steps, "decode": decode,
            "student_mfu": result.student_mfu(),
            "student_mfu_executed": result.student_mfu(executed=True),
            "phases_ms": {k: v * 1e3 for k, v in result.timing.phases.items()},
            "step_ms": result.timing.step_s * 1e3, "peak_flops": result.peak}


def part_loss(bundle, scale: Scale) -> dict:
    from benchmarks.bench_loss_kernel import loss_variants, loss_verdicts, measure_loss

    device = bundle.device
    variants = loss_variants(device, interpret_triton=device.type != "cuda")
    rows = measure_loss(device, scale.dtype, variants, ["logit"], scale.loss_batches, scale.loss_tokens,
                        scale.loss_vocab, hidden=0, window_len=scale.window_len, repeats=scale.loss_repeats)
    verdicts = loss_verdicts(rows)
    eager = {r.batch: r for r in rows if r.variant == "eager"}
    out = {"tokens": scale.loss_tokens, "vocab": scale.loss_vocab, "rows": []}
    for r in rows:
        v = verdicts.get((r.mode, r.batch))
        out["rows"].append({
            "batch": r.batch, "variant": r.variant, "ms": r.ms.as_dict(), "extra_mib": r.extra_mib,
            "first_call_s": r.first_call_s, "vs_eager": ratio_stat(eager[r.batch].seconds, r.seconds).as_dict(),
            "vs_compile": v["vs_compile"].as_dict() if v and v["vs_compile"] and r.variant == "triton" else None,
            "memory_share": v["memory_share"] if v and r.variant == "triton" else None})
    return out


def part_var(scale: Scale, device: torch.device) -> dict:
    """The VAR family's erasure step at the preset's shape (the 2B shape on a GPU) against a per-scale loop."""
    from benchmarks.bench_rollout import sync_of
    from benchmarks.bench_var_step import PER_SCALE, build_bench_bundle, measure_var_step

    t = time.perf_counter()
    bundle = build_bench_bundle(scale.var_preset, device, scale.dtype)
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in bundle.model.parameters())
    bench = measure_var_step(bundle, scale.var_batch, first_k_layers=2, repeats=scale.var_repeats,
                             sync=sync_of(device))
    return {"preset": scale.var_preset, "transformer_parameters": n_params, "build_s": build_s,
            "shape": bench.shape, "supervised_tokens": bench.tokens,
            "same_objective": {"step_loss": bench.step_loss, "per_scale_loop_loss": bench.loop_loss},
            "ms_per_call": {k: Stat.of(v).scaled(1e3).as_dict() for k, v in bench.times.items()},
            "supervised_tokens_per_s": {k: rate_stat(v, bench.tokens).as_dict() for k, v in bench.times.items()},
            f"vs {PER_SCALE}": {k: r.as_dict() for k, r in bench.ratios().items()}}


def part_exact(scale: Scale, device: torch.device) -> dict:
    """The lean decode path's greedy tokens against the eager loop's, in float32 with TF32 off, at the suite's
    shape. In bf16 (the rollout part) random weights leave near-ties between codes, so one rounding difference
    changes a token and every later one: there a low share of equal tokens cannot tell a bug from rounding;
    here the two loops must agree on every token."""
    from benchmarks.bench_rollout import EAGER, measure_rollouts, prompt_ids

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        bundle = build_model(dataclasses.replace(scale, dtype=torch.float32), device)
        ids, mask = prompt_ids(bundle, scale.exact_batch)
        bench = measure_rollouts(bundle, ids, mask, 5.0, scale.lean, repeats=0, with_generate=False)  # untimed
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    lean = f"ours, lean ({scale.lean})"
    if lean not in bench.tokens:
        raise RuntimeError(f"the lean path did not run: {bench.failed}")
    differ = (bench.tokens[lean].cpu() != bench.tokens[EAGER].cpu())
    return {"dtype": "float32 (TF32 off)", "rows": scale.exact_batch, "image_tokens": int(differ.shape[1]),
            "lean": scale.lean, "token_agreement": float((~differ).float().mean()),
            "first_differing_token_per_row": [int(r.nonzero()[0]) if r.any() else None for r in differ]}


# --------------------------------------------------------------------------- the run


class Interrupted(Exception):
    """SIGTERM arrived (``timeout``, a lease ending): the suite records where it stopped and ends."""


def _interrupt(signum, frame):
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


class Suite:
    """Runs the parts in order within a time limit, records each, and rewrites the JSON after each."""

    def __init__(self, out_dir: Path, scale: Scale, smoke: bool, time_limit_s: float):
        from ear_dist.telemetry.nvml import NvmlMonitor

        self.out_dir, self.scale, self.smoke, self.time_limit_s = out_dir, scale, smoke, time_limit_s
        self.bundle = None  # the shared model, while parts use it
        self.t0 = time.perf_counter()
        self.monitor = NvmlMonitor(interval_s=0.1)
        self.record: dict = {
            "suite": "gpu_suite", "mode": "smoke" if smoke else "full",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(), "machine": machine_line(), "versions": _versions(), "commit": _commit(),
            "scale": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in dataclasses.asdict(scale).items()},
            "parts": {}, "complete": False,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def decode(self) -> str:
        """The rollout.decode the later parts use: the lean path unless the rollout part saw it fail (then
        eager, and the JSON says so); ``uncaptured`` is a check, not a setting."""
        lean = self.scale.lean
        if lean == "uncaptured":
            return "eager"
        failed = _figure(self.record, "rollout", "failed") or {}
        if f"ours, lean ({lean})" in failed:
            self.record["decode_fallback"] = f"later parts use rollout.decode=eager: the {lean} path failed"
            return "eager"
        return lean

    def run(self, name: str, fn: Callable[[], dict]) -> None:
        """Run one part (unless the time limit is reached), record it, write the JSON."""
        from ear_dist.telemetry.memory import peak_memory, reset_peak_memory

        expected = 0 if self.smoke else EXPECTED_S.get(name, 0)
        if self.elapsed() + expected > self.time_limit_s:
            self.record["parts"][name] = {"status": f"skipped: at {self.elapsed():.0f} s, with about {expected} s "
                                                    f"to run, it would end after --time-limit-s "
                                                    f"{self.time_limit_s:.0f}"}
            print(f"== {name}: skipped (time limit)")
            self.write()
            return
        print(f"== {name} (at {self.elapsed():.0f} s)", flush=True)
        device = self.record.get("device_type", "cpu")
        reset_peak_memory(device)
        at_start = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
        self.monitor.begin_step()
        t = time.perf_counter()
        entry: dict = {}
        try:
            entry["figures"] = fn()
            entry["status"] = "done"
        except Interrupted as e:  # stop here, keeping this part's record and every earlier one
            entry["status"] = f"not finished: {e} after {time.perf_counter() - t:.0f} s in this part"
            self.record["parts"][name] = entry
            self.write()
            raise
        except Exception as e:  # the other parts still run: a rare GPU lease should yield what it can
            traceback.print_exc()
            entry["status"] = f"failed: {type(e).__name__}: {e}"
        entry["seconds"] = time.perf_counter() - t
        memory = peak_memory(device)
        entry["peak_memory_gib"] = memory.peak_gib
        entry["peak_memory_kind"] = memory.kind
        entry["allocated_at_start_gib"] = at_start  # what earlier parts left (the shared model): inside the peak
        entry["allocated_at_end_gib"] = self.free_part_memory()
        nvml = self.monitor.end_step()
        entry["nvml"] = dataclasses.asdict(nvml) if self.monitor.available else \
            {"unavailable": self.monitor.unavailable_reason}
        self.record["parts"][name] = entry
        print(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        self.write()

    def free_part_memory(self) -> Optional[float]:
        """Drop what a part leaves behind (the lean decoder's static KV cache of its last rollout batch, a step's
        student) so the next part starts from the shared model alone; returns the GiB still allocated (CUDA)."""
        from ear_dist.models.janus.decode import release_decoders

        if self.bundle is not None:
            release_decoders(self.bundle.model)
        gc.collect()
        if self.record.get("device_type") != "cuda":
            return None
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30

    def write(self) -> None:
        from ear_dist.telemetry.writer import write_json

        self.record["seconds"] = self.elapsed()
        self.record["goals"] = goal_rows(self.record) if not self.smoke else []
        write_json(self.out_dir / "gpu_suite.json", _finite(self.record))
        text = markdown(self.record)
        tmp = self.out_dir / "gpu_suite.md.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.out_dir / "gpu_suite.md")

    def close(self) -> None:
        self.record["complete"] = True
        self.write()
        self.monitor.close()


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _commit() -> Optional[str]:
    """The code measured: $EAR_DIST_COMMIT (a copy without git history, as on a lent GPU machine), else git's HEAD."""
    if os.environ.get("EAR_DIST_COMMIT"):
        return os.environ["EAR_DIST_COMMIT"]
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _finite(value):
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _figure(record: dict, part: str, *keys):
    node = record["parts"].get(part, {}).get("figures")
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def goal_rows(record: dict) -> list[dict]:
    """Each goal with the figure measured for it (the median where it has repeats) and whether it is met."""
    rows = []

    def add(goal: str, figure, target: float, higher_is_better: bool = True, note: str = ""):
        value = figure["median"] if isinstance(figure, dict) else figure
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        rows.append({"goal": goal, "value": value, "measured": figure, "target": target, "met": met, "note": note})

    stored = "ours (stored rollout)"
    add("step vs the official pattern (stored rollouts)", _figure(record, "step", "speedups", stored, "vs_official"),
        GOALS["step_vs_official"])
    add("step vs the KV-cached per-token loop", _figure(record, "step", "speedups", stored, "vs_kv_loop"),
        GOALS["step_vs_kv_loop"])
    for row in _figure(record, "loss", "rows") or []:
        if row["variant"] != "triton":
            continue
        b = row["batch"]
        add(f"fused loss vs eager, B={b}", row["vs_eager"], GOALS["loss_vs_eager"])
        add(f"fused loss vs torch.compile, B={b}", row["vs_compile"], GOALS["loss_vs_compile"])
        add(f"fused loss extra memory / eager's, B={b}", row["memory_share"], GOALS["loss_memory_share"], False)
    add("student MFU (6N convention)", _figure(record, "mfu", "student_mfu"), GOALS["student_mfu"])
    lean = f"ours, lean ({record['scale']['lean']}) / generate"
    failed = _figure(record, "rollout", "failed") or {}
    add("rollout tokens/s vs transformers generate", _figure(record, "rollout", lean), GOALS["rollout_vs_generate"],
        note=f"generate did not run: {failed['transformers generate']}" if "transformers generate" in failed else "")
    add("lean rollout's greedy tokens equal to the eager loop's, float32 (share)",
        _figure(record, "exact", "token_agreement"), 1.0)
    add("erase one concept end to end (exact windows), s", _figure(record, "headline", "recompute", "total_s"),
        GOALS["headline_s"], False)
    many = record["parts"].get("many", {}).get("figures") or {}
    add(f"many concepts: s per concept, {many.get('concepts', '?')} concepts' pairs in one joint run",
        many.get("projected_s_per_concept"), GOALS["many_s_per_concept"], False,
        note=f"projected from {many['pairs_per_concept_measured']} of {PAPER_PAIRS} pairs per concept" if many else "")
    ev = record["parts"].get("eval", {}).get("figures") or {}
    add("eval images/s per GPU, 576-token CFG samples", ev.get("images_per_s"), GOALS["eval_images_per_s"],
        note=f"batch {ev['batch']}; memory-bandwidth bound {_fmt(ev.get('bound_images_per_s'), '.1f')} images/s"
        if ev else "")
    return rows


def _fmt(value, spec=".2f", unit="") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict) and "median" in value:
        return Stat(value["median"], value["min"], value["max"], value["repeats"]).fmt(spec, unit)
    return format(value, spec) + unit if isinstance(value, (int, float)) else str(value)


def markdown(record: dict) -> str:
    """The suite as markdown: what ran where, the goals, every part's figures, power and memory."""
    lines = [f"# GPU suite ({record['mode']})", "",
             f"- date: {record['date']}", f"- {record['machine']}", f"- command: `{record['command']}`",
             f"- versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}",
             f"- commit: {record.get('commit') or 'unknown'}",
             f"- {'complete' if record['complete'] else 'INCOMPLETE'}, {record['seconds']:.0f} s"]
    if record.get("decode_fallback"):
        lines.append(f"- {record['decode_fallback']}")
    lines.append("")
    if record["goals"]:
        lines += ["| goal | measured: median (min-max) | target | met |", "|---|---|---|---|"]
        for g in record["goals"]:
            met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
            note = f" ({g['note']})" if g["note"] else ""
            lines.append(f"| {g['goal']} | {_fmt(g['measured'])}{note} | {g['target']:g} | {met} |")
        lines.append("")
    elif record["mode"] == "smoke":
        lines += ["Smoke run: CPU and a small model; the figures check that every part runs, they are not the "
                  "goals' figures.", ""]
    lines += ["| part | status | s | peak memory GiB | NVML power W mean / max | energy J |", "|---|---|---|---|---|---|"]
    for name, p in record["parts"].items():
        nvml = p.get("nvml", {})
        power = f"{_fmt(nvml.get('power_w_mean'), '.0f')} / {_fmt(nvml.get('power_w_max'), '.0f')}"
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('seconds'), '.1f')} | "
                     f"{_fmt(p.get('peak_memory_gib'))} | {power} | {_fmt(nvml.get('energy_j'), '.0f')} |")
    lines.append("")
    step = _figure(record, "step", "speedups") or {}
    if step:
        lines += ["| our step (2 pairs) | vs official pattern | vs KV-cached per-token loop |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['vs_official'], '.1f', 'x')} | {_fmt(v['vs_kv_loop'], '.1f', 'x')} |"
                  for k, v in step.items()]
        lines.append("")
    rates = _figure(record, "rollout", "image_tokens_per_s") or {}
    if rates:
        lines += ["| rollout loop | image tokens/s | tokens equal to the eager loop's |", "|---|---|---|"]
        for k, v in rates.items():
            agree = _figure(record, "rollout", f"token_agreement_with_eager: {k}")
            lines.append(f"| {k} | {_fmt(v, ',.0f')} | {'-' if agree is None else f'{agree:.1%}'} |")
        for k, error in (_figure(record, "rollout", "failed") or {}).items():
            lines.append(f"| {k} | did not run: {error} | |")
        lines.append("")
    var = record["parts"].get("var", {}).get("figures")
    if var:
        lines += [f"VAR family, {var['preset']}: {var['shape']}", "",
                  "| VAR step | ms per call | supervised tokens/s |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v, '.1f')} | {_fmt(var['supervised_tokens_per_s'][k], ',.0f')} |"
                  for k, v in var["ms_per_call"].items()]
        lines.append("")
    head = record["parts"].get("headline", {}).get("figures")
    if head:
        lines += ["| erase one concept | total s | rollouts s | training s |", "|---|---|---|---|"]
        lines += [f"| window_prefix={k} | {_fmt(head[k]['total_s'], '.1f')} | {_fmt(head[k]['rollouts_s'], '.1f')} | "
                  f"{_fmt(head[k]['training_s'], '.1f')} |" for k in ("recompute", "cached") if k in head]
        lines.append("")
    many = record["parts"].get("many", {}).get("figures")
    if many:
        m = many["measured"]
        lines += [f"Many concepts: {many['concepts']} concepts, one pair of each per step (window updates over "
                  f"{many['pairs_per_step']} rows): measured {many['steps_measured']} steps in {m['total_s']:.1f} s "
                  f"(rollouts {m['rollouts_s']:.1f} s, training {m['training_s']:.1f} s); projected to "
                  f"{many['projected_pairs_per_concept']} pairs per concept: {many['projected_total_s']:.0f} s, "
                  f"{many['projected_s_per_concept']:.1f} s per concept ({many['projection']}).", ""]
    ev = record["parts"].get("eval", {}).get("figures")
    if ev:
        bound = (f"; memory-bandwidth bound {ev['bound_images_per_s']:.1f} images/s at "
                 f"{ev['bandwidth_gb_s_measured']:.0f} GB/s measured ({ev['share_of_bound']:.0%} of it; "
                 f"{ev['bound_images_per_s_static_cache']:.1f} if every step reads the whole static cache)"
                 if ev.get("bound_images_per_s") else "; no bandwidth bound on a CPU")
        lines += [f"Eval sampling: batch {ev['batch']} ({ev['kv_cache_gib']:.1f} GiB KV cache, budget "
                  f"{ev['kv_budget_source']}): {_fmt(ev['images_per_s'], '.2f')} images/s, "
                  f"{_fmt(ev['images_per_s_with_vq_decode'], '.2f')} with the VQ decode{bound}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_suite", help="gpu_suite.json, gpu_suite.md and the bench logs")
    ap.add_argument("--smoke", action="store_true", help="CPU, small model: every part runs, in CI")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--time-limit-s", type=float, default=480.0,
                    help="parts that would start after this many seconds are skipped and reported (default 480)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: {', '.join(unknown)} not in {', '.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; the full suite needs one GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels' correctness path; read at kernel import
    scale = SMOKE if args.smoke else FULL
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = Suite(out_dir, scale, args.smoke, args.time_limit_s)
    suite.record["device_type"] = device.type
    for name in PARTS:  # replaced as each part runs: a run cut short says which parts it never reached
        suite.record["parts"][name] = {"status": "not run: the run ended before it" if name in parts else
                                       "not run: not in --parts"}
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` or a lease ending: record the part it stopped in
    suite.write()
    print(f"gpu_suite ({suite.record['mode']}): {suite.record['machine']}\ncommand: {suite.record['command']}")

    shared = [p for p in parts if p not in OWN_MODEL]
    bundle = None
    if shared:
        t = time.perf_counter()
        bundle = build_model(scale, device)
        n_params = sum(p.numel() for p in bundle.model.parameters())
        suite.record["model"] = {"name": scale.model, "parameters": n_params, "dtype": str(scale.dtype),
                                 "image_tokens": bundle.num_image_tokens, "build_s": time.perf_counter() - t,
                                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        print(f"built {scale.model}: {n_params:,} parameters in {suite.record['model']['build_s']:.1f} s")
    suite.bundle = bundle
    runners = {
        "rollout": lambda: part_rollout(bundle, scale),
        "step": lambda: part_step(bundle, scale, suite.decode()),
        "headline": lambda: part_headline(bundle, scale, suite.decode()),
        "many": lambda: part_many(bundle, scale, suite.decode()),
        "eval": lambda: part_eval(bundle, scale, suite.decode()),
        "mfu": lambda: part_mfu(bundle, scale, suite.decode(), out_dir / "bench"),
        "loss": lambda: part_loss(bundle, scale),
        "var": lambda: part_var(scale, device),
        "exact": lambda: part_exact(scale, device),
    }
    try:
        for name in shared:
            suite.run(name, runners[name])
        suite.free_part_memory()
        bundle = suite.bundle = None  # the parts below build their own model, with the shared one freed
        for name in (p for p in parts if p in OWN_MODEL):
            suite.run(name, runners[name])
    except Interrupted as e:
        print(f"gpu_suite: {e}; what was measured is in {out_dir / 'gpu_suite.json'}", file=sys.stderr)
        suite.record["interrupted"] = str(e)
        suite.write()
        return 1
    suite.close()
    print(markdown(suite.record))
    return 1 if any(p["status"].startswith("failed") for p in suite.record["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
