"""What erasing N concepts costs: measured on the planted-concept world, projected to Janus-Pro-7B.

Measured on the world's model (one process, CPU), each figure the median (min-max) over its repeats:

1. **steps**: the training step of the paper's EAR, the preserving recipe and the ``many`` recipe (the world's
   ``world-ear``, ``world-preserving``, ``world-many``) with 1 pair per step (a single-concept run, an array
   task) and 5 (a joint step of ``many``), on pairs of several concepts with their surrogate tokens stored (as
   ``erase-many``'s filter stage leaves them), and a run's setup (anchors' rollouts and distributions,
   projectors);
2. **anchors**: the preserving parts for M anchor prompts (a joint run of N concepts holds every concept's
   anchors): build time, one drift refresh of every anchor (every ``preserve.refresh_every`` steps), the
   anchors' cached teacher distributions and the projectors in bytes (counted
   tensor by tensor, beside the formula of ``ear_dist/many/cost.py`` at the world's shape), the preserved rank;
3. **composition**: N deltas of the preserving recipe's trained tensors composed by ``sum`` (``merge``'s
   streaming ``apply_deltas``), ``ties`` and ``project`` (``ear_dist/models/compose.py``): seconds and the
   process's peak resident memory growth in a fresh process (sampled every 2 ms), beside the formula's host
   bytes; one delta's size. Seconds: the composition timed in this process and in the fresh one.

Then the projection to Janus-Pro-7B (``ear_dist/many/cost.py``, FLOPs by ``ear_dist/telemetry/flops.py``'s
conventions): per method and route (one joint run; N array runs composed by sum, project or ties), the steps,
FLOPs, H100-seconds at ``--mfu`` of the bf16 peak (the float64 eigendecompositions at the FP64 peak), the memory
beyond the frozen model, for N = ``--project-n``.

    OMP_NUM_THREADS=1 python benchmarks/bench_many_cost.py --set world.cache_dir=/work/cache/runner/default_world_model
        [--steps 4] [--anchors 16,128] [--deltas 1,5,20] [--project-n 1,5,10,20,40] [--mfu 0.3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ear_dist.config import add_config_args, config_from_args  # noqa: E402

RECIPES = {"EAR (paper)": ("world-ear", "ear"), "preserving": ("world-preserving", "preserving"),
           "many": ("world-many", "many")}
ROUTES = ("joint", "sum", "project", "ties")
MiB = 1024 ** 2


class PeakRss:
    """The process's resident memory above its level at entry, at its highest (sampled every 2 ms)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _parts_bytes(keep) -> tuple[int, int]:
    """(projector bytes, anchor cache bytes) a run's preserving parts hold, tensor by tensor."""
    proj = _nbytes(keep.edits.projectors.values()) if keep.edits.projectors else 0
    cache = 0
    if keep.preservation is not None:
        a = keep.preservation.anchors
        cache = _nbytes([*a.teacher.values(), a.tokens])
    return proj, cache


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", default="church,barn,van gogh,castle,monet", help="the pairs' concepts")
    p.add_argument("--pairs", type=int, default=8, help="pairs per concept")
    p.add_argument("--steps", type=int, default=4, help="measured steps per recipe and batch (after one warm-up)")
    p.add_argument("--anchors", default="16,128", help="anchor counts M of the anchors section")
    p.add_argument("--deltas", default="1,5,20", help="delta counts N of the composition section")
    p.add_argument("--compose-repeats", type=int, default=1,
                   help="compositions timed in this process (one more runs in a fresh process for its memory)")
    p.add_argument("--compose-prompts", type=int, default=4, help="project: prompts per concept (world)")
    p.add_argument("--project-n", default="1,5,10,20,40", help="concept counts of the Janus-Pro-7B projection")
    p.add_argument("--mfu", type=float, default=0.3, help="assumed utilisation of the H100 for the projection")
    p.add_argument("--anchors-per-concept", type=int, default=16, help="7B: anchor prompts each concept's entry "
                   "brings (a joint run holds all of them, an array task its own)")
    p.add_argument("--pairs-per-concept", type=int, default=32, help="7B: ECG pairs per concept (filter rollouts)")
    p.add_argument("--kept-prompts", type=int, default=64, help="7B: project's kept prompts")
    p.add_argument("--json", default="", help="write every figure here too")
    p.add_argument("--compose-child", default="", help=argparse.SUPPRESS)  # N:method:delta dir (memory probe)
    add_config_args(p)
    args = p.parse_args(argv)
    if args.compose_child:
        return compose_child(args)
    import torch

    from benchmarks.common import Stat, command_line, ratio_stat, run_header
    from ear_dist.config import load_config
    from ear_dist.world.pretrain import build_world_model
    from ear_dist.world.world import World
    from ear_dist.models.family import load_model

    torch.set_num_threads(1)
    logging.getLogger("ear_dist.train.job").setLevel(logging.ERROR)  # the null space's frozen norms, per build
    t_all = time.perf_counter()
    cfg = config_from_args(args)
    world = World(cfg.world)
    path, _ = build_world_model(cfg.world, progress=False)
    bundle = load_model(str(path), device="cpu", dtype="float32")
    print("\n".join(run_header("many-concept cost")) + f"\n# commit {_commit()}, world model {path}", flush=True)
    out: dict = {"command": command_line(), "commit": _commit()}

    from ear_dist.world.erasure import make_pairs
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    pairs = []
    for c in concepts:
        pairs += make_pairs(world, c, args.pairs, avoid=concepts)
    gw = cfg.world.guidance_weight
    tokens = bundle.sample([q.surrogate for q in pairs], guidance_weight=gw, seeds=list(range(len(pairs))))
    for q, row in zip(pairs, tokens):
        q.surrogate_tokens = row.tolist()
    kept_objects = [o for o in world.vocab.objects if o not in concepts]
    anchor_pool = world.sample(max(int(m) for m in args.anchors.split(",")), "train", stream=977,
                               objects=kept_objects, styles=[None]).prompts
    base_overrides = [f"model.path={path}", "model.device=cpu", "model.dtype=float32", "train.resume=never",
                      f"rollout.guidance_weight={gw}"]

    # ---------------------------------------------------------------- 1. steps
    from ear_dist.data.stream import PairStream
    from ear_dist.distributed.runtime import init_runtime
    from ear_dist.many.cost import ModelShape, recipe_shape, step_flops
    from ear_dist.train.job import build_job

    ids, _ = bundle.encode_prompts([pairs[0].target])
    wshape = ModelShape.of(bundle.model.config, bundle.num_image_tokens, int(ids.shape[1]), dtype_bytes=4)
    n_layers = bundle.model.config.text_config.num_hidden_layers
    steps_rows = []
    print("\n## Steps on the world (CPU, one thread)\n")
    print("| method | pairs per step | step ms | per pair ms | setup s | anchors | step FLOPs, formula (MFLOP) | "
          "projectors, bytes | anchor cache, bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (recipe, _) in RECIPES.items():
            jobs = {}
            for b in (1, 5):  # both batches built, then their steps interleaved: load hits both alike
                overrides = [*base_overrides, f"train.pairs_per_step={b}", f"train.out_dir={tmp}/{recipe}-{b}"]
                rcfg = load_config(recipes=[recipe], overrides=overrides + list(args.overrides))
                if rcfg.preserve.weight > 0 or rcfg.preserve.nullspace:
                    rcfg.preserve.prompts = list(anchor_pool[:64])
                rt = init_runtime(rcfg)
                torch.manual_seed(rcfg.train.seed)
                stream = PairStream(pairs, b, seed=0)
                t = time.perf_counter()
                job = build_job(rcfg, rt, bundle, stream, teacher_steps=args.steps + 1)
                jobs[b] = (job, stream, rt, time.perf_counter() - t, [])
            for i in range(args.steps + 1):
                for b, (job, stream, rt, _, times) in jobs.items():
                    batch = stream.next().local(rt.dp_rank, rt.dp_world, bundle.device)
                    t = time.perf_counter()
                    job.step(batch)
                    if i:  # the first is a warm-up (and the first drift measurement)
                        times.append(time.perf_counter() - t)
            ratio = ratio_stat(jobs[5][4], jobs[1][4])  # per repeat: 5-pair step time / 1-pair step time
            for b, (job, stream, rt, setup_s, times) in jobs.items():
                proj_b, cache_b = _parts_bytes(job.keep)
                shape = recipe_shape(recipe, n_layers, (f"train.pairs_per_step={b}",))
                flops = sum(step_flops(wshape, shape, job.keep.anchors).values())
                st = Stat.of(times).scaled(1e3)
                row = {"method": label, "recipe": recipe, "pairs_per_step": b, "step_ms": st.as_dict(),
                       "per_pair_ms": st.scaled(1 / b).as_dict(), "setup_s": setup_s,
                       "step_flops_formula": flops, "projector_bytes": proj_b, "anchor_cache_bytes": cache_b,
                       "anchors": job.keep.anchors, "five_over_one": ratio.as_dict()}
                steps_rows.append(row)
                print(f"| {label} | {b} | {st.fmt('.1f')} | {st.scaled(1 / b).fmt('.1f')} | {setup_s:.2f} | "
                      f"{job.keep.anchors} | {flops / 1e6:,.0f} | {proj_b:,} | {cache_b:,} |", flush=True)
            del jobs
    out["steps"] = steps_rows
    print("\nJoint step (5 pairs) over single-concept step (1 pair): step time, per repeat of the interleaved "
          "steps; the formula's FLOPs ratio at the world's shape beside it:")
    for label in RECIPES:
        one, five = (next(r for r in steps_rows if r["method"] == label and r["pairs_per_step"] == b)
                     for b in (1, 5))
        measured = Stat(**{k: five["five_over_one"][k] for k in ("median", "min", "max")},
                        n=five["five_over_one"]["repeats"])
        formula = five["step_flops_formula"] / one["step_flops_formula"]
        print(f"- {label}: x{measured.fmt('.2f')} measured, x{formula:.2f} by the formula")
        out.setdefault("joint_over_single", {})[label] = {"measured": measured.as_dict(), "formula": formula}

    # ---------------------------------------------------------------- 2. anchors
    from ear_dist.many.cost import anchor_cache_bytes, projector_bytes, trained_linears
    from ear_dist.train.preserve import build_preserving_parts
    from ear_dist.train.job import projectable
    from ear_dist.train.trainable import select_trainable_names

    print("\n## Anchors of the preserving recipe on the world: M prompts\n")
    print("| anchors M | build s (rollouts, distributions, projectors) | drift refresh ms | anchor cache, bytes "
          "(formula) | projectors, bytes (formula) | preserved rank, mean over layers |")
    print("|---|---|---|---|---|---|")
    pshape = recipe_shape("world-preserving", n_layers)
    anchors_rows = []
    for m in [int(x) for x in args.anchors.split(",")]:
        rcfg = load_config(recipes=["world-preserving"], overrides=base_overrides + list(args.overrides))
        rcfg.preserve.prompts = list(anchor_pool[:m])
        rcfg.preserve.surrogates = 0
        rt = init_runtime(rcfg)
        trainable = projectable(bundle.model, select_trainable_names(bundle.model, rcfg.trainable), False)
        t = time.perf_counter()
        keep = build_preserving_parts(rcfg, rt, bundle, trainable, ())
        build_s = time.perf_counter() - t
        rs = []
        for _ in range(3):
            keep.preservation.steps = 0
            t = time.perf_counter()
            keep.preservation.maybe_refresh(bundle.model, bundle)
            rs.append(time.perf_counter() - t)
        proj_b, cache_b = _parts_bytes(keep)
        f_cache = anchor_cache_bytes(wshape, m, pshape.branches)
        f_proj = projector_bytes(trained_linears(wshape, pshape), 4)
        rank = sum(keep.nullspace_ranks.values()) / len(keep.nullspace_ranks)
        refresh = Stat.of(rs).scaled(1e3)
        anchors_rows.append({"anchors": m, "build_s": build_s, "refresh_ms": refresh.as_dict(),
                             "anchor_cache_bytes": cache_b, "anchor_cache_formula": f_cache,
                             "projector_bytes": proj_b, "projector_formula": f_proj, "mean_rank": rank})
        print(f"| {m} | {build_s:.2f} | {refresh.fmt('.0f')} | {cache_b:,} ({f_cache:,}) | {proj_b:,} ({f_proj:,}) | "
              f"{rank:.1f} |", flush=True)
    out["anchors"] = anchors_rows

    # ---------------------------------------------------------------- 3. composition
    from ear_dist.many.cost import compose_cost, compose_peak_bytes
    from ear_dist.models.delta import save_delta
    from ear_dist.models.fingerprint import model_fingerprint

    print("\n## Composing N deltas of the preserving recipe's tensors on the world\n")
    print("| deltas N | method | seconds | peak RSS growth, MiB (a fresh process) | formula's host memory, MiB "
          "(with the unions' bound) |")
    print("|---|---|---|---|---|")
    compose_rows = []
    fp = model_fingerprint(bundle.model)
    params = dict(bundle.model.named_parameters())
    delta_bytes = None
    with tempfile.TemporaryDirectory() as tmp:
        n_max = max(int(x) for x in args.deltas.split(","))
        paths = []
        g = torch.Generator().manual_seed(0)
        for i in range(n_max):
            tensors = {n: (params[n].detach() + 1e-3 * params[n].detach().std() *
                           torch.randn(params[n].shape, generator=g)).contiguous() for n in trainable}
            paths.append(str(save_delta(Path(tmp) / f"d{i}.safetensors", tensors, fp, str(path), [f"c{i}"], {})))
        delta_bytes = Path(paths[0]).stat().st_size
        prompts, kept = _compose_prompts(world, args.compose_prompts * n_max, kept_objects)
        for n in [int(x) for x in args.deltas.split(",")]:
            sets = [prompts[i * args.compose_prompts: (i + 1) * args.compose_prompts] for i in range(n)]
            for how in ("sum", "ties", "project"):
                secs = []
                for _ in range(args.compose_repeats):
                    t = time.perf_counter()
                    _compose(bundle, paths[:n], sets, kept, how, gw)
                    secs.append(time.perf_counter() - t)
                growth, child_s = _child_growth(args, n, how, tmp)
                secs.append(child_s)
                _, _, host = compose_cost(wshape, pshape, n, how, args.compose_prompts, len(kept))
                s = Stat.of(secs)
                compose_rows.append({"deltas": n, "method": how, "seconds": s.as_dict(), "rss_growth_mib": growth / MiB,
                                     "formula_host_mib": compose_peak_bytes(host) / MiB,
                                     "formula_bound_mib": compose_peak_bytes(host, bound=True) / MiB})
                print(f"| {n} | {how} | {s.fmt('.3f')} | {growth / MiB:.1f} | {compose_peak_bytes(host) / MiB:.1f} "
                      f"({compose_peak_bytes(host, bound=True) / MiB:.1f}) |", flush=True)
    counts = sorted({r["deltas"] for r in compose_rows})
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        print(f"\nMemory per added delta, from N = {lo} to {hi} (MiB per delta): measured, formula")
        for how in ("sum", "ties", "project"):
            a, b = (next(r for r in compose_rows if r["deltas"] == n and r["method"] == how) for n in (lo, hi))
            slope = (b["rss_growth_mib"] - a["rss_growth_mib"]) / (hi - lo)
            formula = (b["formula_host_mib"] - a["formula_host_mib"]) / (hi - lo)
            print(f"- {how}: {slope:.2f}, {formula:.2f}")
            out.setdefault("compose_slope_mib", {})[how] = {"measured": slope, "formula": formula}
    print(f"\nOne delta of the preserving recipe's tensors on the world: {delta_bytes:,} bytes "
          f"({len(trainable)} tensors, float32).")
    out["compose"] = compose_rows
    out["delta_bytes_world"] = delta_bytes

    # ---------------------------------------------------------------- 4. projection to Janus-Pro-7B
    out["projection"] = projection(args)
    out["seconds"] = time.perf_counter() - t_all
    print(f"\nTotal: {out['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _compose_prompts(world, n: int, kept_objects) -> tuple[list[str], list[str]]:
    """project's prompts: ``n`` training prompts (the concepts' sets) and 8 prompts of kept objects."""
    return (world.sample(n, "train", stream=979).prompts,
            world.sample(8, "train", stream=978, objects=kept_objects, styles=[None]).prompts)


def _compose(bundle, paths, sets, kept, how: str, gw: float, in_place: bool = False) -> None:
    """One composition as ``merge`` runs it: ``sum`` streams (``apply_deltas``; ``in_place``: into the loaded
    model, as ``merge`` does, else restored afterwards), the others ``compose_deltas``."""
    from ear_dist.models.compose import compose_deltas
    from ear_dist.models.delta import applied_deltas, apply_deltas

    if how == "sum" and in_place:
        apply_deltas(bundle.model, paths)
    elif how == "sum":
        with applied_deltas(bundle.model, paths):
            pass
    else:
        compose_deltas(bundle, paths, sets, kept, how, guidance_weight=gw)


def _child_growth(args, n: int, how: str, tmp: str) -> tuple[int, float]:
    """(Peak RSS growth, seconds) of one composition in a fresh process whose freed tensors go back to the system
    (``MALLOC_MMAP_THRESHOLD_``): what it holds, not what the allocator kept from earlier work."""
    import os

    cmd = [sys.executable, str(Path(__file__).resolve()), "--compose-child", f"{n}:{how}:{tmp}",
           "--compose-prompts", str(args.compose_prompts), "--concepts", args.concepts, "--deltas", args.deltas,
           *[x for o in args.overrides for x in ("--set", o)]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return int(found["growth"]), float(found["seconds"])


def compose_child(args) -> int:
    import torch

    from ear_dist.models.family import load_model
    from ear_dist.world.pretrain import build_world_model
    from ear_dist.world.world import World
    import ear_dist.models.compose  # noqa: F401  (imported before the baseline)
    import ear_dist.train.preserve  # noqa: F401

    torch.set_num_threads(1)
    n, how, tmp = args.compose_child.split(":", 2)
    n = int(n)
    cfg = config_from_args(args)
    world = World(cfg.world)
    path, _ = build_world_model(cfg.world, progress=False)
    bundle = load_model(str(path), device="cpu", dtype="float32")
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    n_max = max(int(x) for x in args.deltas.split(","))
    prompts, kept = _compose_prompts(world, args.compose_prompts * n_max,
                                     [o for o in world.vocab.objects if o not in concepts])
    sets = [prompts[i * args.compose_prompts: (i + 1) * args.compose_prompts] for i in range(n)]
    paths = [str(Path(tmp) / f"d{i}.safetensors") for i in range(n)]
    with PeakRss() as rss:
        t = time.perf_counter()
        _compose(bundle, paths, sets, kept, how, cfg.world.guidance_weight, in_place=True)
        seconds = time.perf_counter() - t
    print(json.dumps({"growth": rss.growth, "seconds": seconds}))
    return 0


def _host(row: dict) -> str:
    exact, bound = row["peak_host_gib"], row["peak_host_bound_gib"]
    return f"{exact:,.1f}" if bound <= exact else f"{exact:,.1f} (at most {bound:,.1f})"


def projection(args) -> dict:
    """The Janus-Pro-7B tables: every method and route at N = 20 (and --project-n), per-step parts."""
    from ear_dist.many.cost import (GIB, H100_BF16, H100_FP64, PROMPT_LEN_7B, ModelShape, anchor_count,
                                    peak_host_bytes, recipe_shape, route_cost, step_flops, trained_params)
    from ear_dist.models.janus.presets import preset_config

    config = preset_config("janus-pro-7b")
    big = ModelShape.of(config, 576, PROMPT_LEN_7B, dtype_bytes=2)
    layers = config.text_config.num_hidden_layers
    ns = [int(x) for x in args.project_n.split(",")]
    kw = dict(anchors_per_concept=args.anchors_per_concept, pairs_per_concept=args.pairs_per_concept,
              kept_prompts=args.kept_prompts)
    res: dict = {"mfu": args.mfu, "assumptions": kw, "rows": []}
    print(f"\n## Projected to Janus-Pro-7B (bf16, 576 image tokens, {PROMPT_LEN_7B}-token prompts; "
          f"{args.mfu:.0%} of an H100's dense peak: bf16 for the model, FP64 for the eigendecompositions)\n")
    print("Per step, by part (PFLOP; M = the anchors of a joint run of 20 concepts):\n")
    print("| method | pairs per step | trained parameters | " + " | ".join(
        ["teacher", "student", "anchors' KL", "drift refresh", "null-space projection", "total"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (_, recipe) in RECIPES.items():
        shape = recipe_shape(recipe, layers)
        parts = step_flops(big, shape, anchor_count(shape, 20, args.anchors_per_concept))
        cells = [parts.get(k, 0.0) / 1e15 for k in ("teacher", "student", "anchors' KL", "drift refresh",
                                                      "null-space projection")]
        print(f"| {label} | {shape.pairs_per_step} | {trained_params(big, shape) / 1e9:.2f} B | " +
              " | ".join(f"{c:.3f}" for c in cells) + f" | {sum(cells):.3f} |")
        res.setdefault("step_pflop", {})[label] = {k: v / 1e15 for k, v in parts.items()}
    for n in ns:
        for label, (_, recipe) in RECIPES.items():
            shape = recipe_shape(recipe, layers)
            for route in ROUTES:
                c = route_cost(big, shape, n, route, **kw)
                row = c.as_dict(args.mfu)
                row["peak_host_gib"] = peak_host_bytes(c) / GIB
                row["peak_host_bound_gib"] = peak_host_bytes(c, bound=True) / GIB
                row["method"] = label
                res["rows"].append(row)
    n_main = 20 if 20 in ns else ns[-1]
    print(f"\nAt N = {n_main} concepts:\n")
    print("| method | route | steps | PFLOP | H100-hours | H100-s per concept | GPU memory beyond the model while "
          "training, GiB (trainable state + projectors) | at setup, GiB (float64 moments + float32 projectors) | "
          "host memory peak, GiB | one delta, GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if r["concepts"] != n_main:
            continue
        gpu = sum(r["gpu_gib"].values())
        print(f"| {r['method']} | {r['route']} | {r['steps']:,} | {r['total_flops'] / 1e15:,.0f} | "
              f"{r['h100_seconds'] / 3600:,.1f} | {r['h100_seconds_per_concept']:,.0f} | {gpu:,.1f} | "
              f"{r['setup_gpu_gib']:,.1f} | "
              f"{_host(r)} | {r['delta_gib']:.2f} |")
    print(f"\nThe composition alone at N = {n_main} (in the totals above; `merge` runs it on the CPU, where the "
          "base model is loaded):\n")
    print("| method | composition | model FLOPs, PFLOP (rollouts, forwards, projection) | float64 FLOPs, PFLOP (moments, eigh) | "
          "H100-s at the same utilisation |")
    print("|---|---|---|---|---|")
    for r in res["rows"]:
        if r["concepts"] != n_main or r["route"] == "joint":
            continue
        model_f = sum(v for k, v in r["flops"].items() if k.startswith("compose: "))
        joint_like = next(x for x in res["rows"] if x["concepts"] == n_main and x["method"] == r["method"]
                          and x["route"] == "sum")
        fp64 = r["fp64_flops"] - joint_like["fp64_flops"]  # the tasks' own projector eigh, the same in every route
        seconds = model_f / (H100_BF16 * args.mfu) + fp64 / (H100_FP64 * args.mfu)
        print(f"| {r['method']} | {r['route']} | {model_f / 1e15:,.2f} | {fp64 / 1e15:,.2f} | {seconds:,.0f} |")
    print("\nH100-seconds per concept by the number of concepts N:\n")
    print("| method | route | " + " | ".join(f"N = {n}" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for label in RECIPES:
        for route in ROUTES:
            cells = [next(r for r in res["rows"] if r["method"] == label and r["route"] == route
                          and r["concepts"] == n)["h100_seconds_per_concept"] for n in ns]
            print(f"| {label} | {route} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    print("\nHost memory at its peak (GiB) by N (joint: the anchors' cached distributions; composed: the "
          "composition's largest phase; project: with its union bases bounded by in x in each, at most the "
          "second figure):\n")
    print("| method | route | " + " | ".join(f"N = {n}" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for label in RECIPES:
        for route in ROUTES:
            cells = [next(r for r in res["rows"] if r["method"] == label and r["route"] == route
                          and r["concepts"] == n) for n in ns]
            print(f"| {label} | {route} | " + " | ".join(_host(c) for c in cells) + " |")
    return res


if __name__ == "__main__":
    sys.exit(main())
