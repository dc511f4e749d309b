"""Forward + backward time and peak extra memory of the windowed, threshold-masked loss.

Compares, on the same inputs and in one run:
  eager    the plain-PyTorch reference (ear_dist.train.loss.reference_windowed_loss)
  compile  torch.compile of that reference
  triton   the fused kernels (ear_dist.kernels.windowed_loss)

GPU (the project's measurement; Janus-Pro-7B shapes are the defaults):
  python benchmarks/bench_loss_kernel.py --device cuda
CPU (runs at a small size; eager vs compile only, unless --interpret-triton, which
runs the kernels under the Triton interpreter: a correctness smoke run, not a speed figure):
  python benchmarks/bench_loss_kernel.py --device cpu [--interpret-triton]

"extra MiB" is the peak memory allocated during forward + backward above what was
allocated before (inputs), including the student's gradient; CUDA only (the CPU
allocator keeps no peak statistics). Project goal on GPU for the kernels: >= 2x eager
and >= 1.3x torch.compile in time, extra memory <= 25% of eager's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_VS_EAGER = 2.0
GOAL_VS_COMPILE = 1.3
GOAL_MEMORY_SHARE = 0.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--modes", default="logit,hidden", help="comma list of logit, hidden")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: 1,4,16 on cuda, 1,2 on cpu)")
    p.add_argument("--tokens", type=int, default=None, help="image tokens per row (default 576 on cuda, 144 on cpu)")
    p.add_argument("--vocab", type=int, default=None, help="logit width (default 16384 on cuda, 1024 on cpu)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default 4096 on cuda, 256 on cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--window-len", type=int, default=48)
    p.add_argument("--kept-fraction", type=float, default=0.5,
                   help="threshold set so that about this share of windows is kept (exercises the mask)")
    p.add_argument("--teacher-cfg", action="store_true", help="logit mode: include an unconditional teacher row")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (cuda) / 1 (cpu)")
    p.add_argument("--repeats", type=int, default=None, help="default 20 (cuda) / 3 (cpu)")
    p.add_argument("--block-size", type=int, default=None,
                   help="triton: chunk over the last dimension (power of two; default min(width, 4096))")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--interpret-triton", action="store_true",
                   help="cpu only: also run the Triton kernels under TRITON_INTERPRET=1 (not a speed figure)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4,16" if gpu else "1,2")).split(",")]
    args.tokens = args.tokens or (576 if gpu else 144)
    args.vocab = args.vocab or (16384 if gpu else 1024)
    args.hidden = args.hidden or (4096 if gpu else 256)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (20 if gpu else 3)
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def _threshold_keeping(window_sums, kept_fraction: float) -> float:
    """A threshold midway between two window sums, so that about ``kept_fraction`` of
    the windows pass and no window sits on the boundary (where the last bit of a sum
    could decide differently between variants)."""
    ordered = window_sums.sort().values.tolist()
    masked = round((1.0 - kept_fraction) * len(ordered))
    if masked <= 0:
        return 0.0
    if masked >= len(ordered):
        return 2.0 * ordered[-1] + 1.0
    return 0.5 * (ordered[masked - 1] + ordered[masked])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_triton:
        if args.device != "cpu":
            print("--interpret-triton is for --device cpu", file=sys.stderr)
            return 2
        # must be set before triton creates the kernels
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from ear_dist.train.loss import reference_windowed_loss, triton_available
    from ear_dist.losses.windowed import window_index

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    gpu = device.type == "cuda"

    # the reference reads the number of windows from the data (a graph break under
    # torch.compile, by design); keep the log to this one line instead of dynamo's warning
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    variants = {"eager": reference_windowed_loss}
    if not args.no_compile:
        variants["compile"] = torch.compile(reference_windowed_loss)
    triton_label = None
    if (gpu and triton_available()) or args.interpret_triton:
        from ear_dist.kernels.windowed_loss import fused_windowed_loss

        triton_label = "triton" if gpu else "triton (interpreter; not a speed figure)"
        variants[triton_label] = functools.partial(fused_windowed_loss, block_size=args.block_size)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    if gpu:
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import importlib.metadata as md

    triton_version = md.version("triton") if triton_available() else "absent"
    print(f"# bench_loss_kernel  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"# device: {device_name}; torch {torch.__version__}; triton {triton_version}")
    print(f"# T={args.tokens} V={args.vocab} H={args.hidden} dtype={args.dtype} window_len={args.window_len} "
          f"kept~{args.kept_fraction:.0%} teacher_cfg={args.teacher_cfg} warmup={args.warmup} repeats={args.repeats} "
          f"block_size={args.block_size or 'auto'}")
    print(f"# command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}")

    rows = []
    for mode in args.modes:
        width = args.vocab if mode == "logit" else args.hidden
        for batch in args.batch_sizes:
            g = torch.Generator(device="cpu").manual_seed(batch)
            shape = (batch, args.tokens, width)

            def make(scale=1.0):
                return (scale * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)

            student = make().requires_grad_(True)
            on_target, on_surrogate = make(), make()
            uncond = make() if (args.teacher_cfg and mode == "logit") else None
            guidance_weight = 5.0 if uncond is not None else 0.0
            idx = window_index(batch, args.tokens, args.window_len, device=device)
            # a threshold at the (1 - kept_fraction) quantile of the window sums
            with torch.no_grad():
                probe = reference_windowed_loss(mode, student, on_target, on_surrogate, idx, 0.0, 1.0,
                                                uncond=uncond, guidance_weight=guidance_weight)
                threshold = _threshold_keeping(probe.window_loss[probe.window_exists].float().cpu(), args.kept_fraction)
            del probe

            def run(fn):
                student.grad = None
                out = fn(mode, student, on_target, on_surrogate, idx, threshold, 1.0,
                         uncond=uncond, guidance_weight=guidance_weight)
                out.loss.backward()
                return out

            results = {}
            for name, fn in variants.items():
                t_first = time.perf_counter()
                for _ in range(max(args.warmup, 1)):
                    out = run(fn)
                sync()
                first_s = time.perf_counter() - t_first
                kept_share = out.num_kept / max(out.num_windows, 1)
                del out
                times = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    run(fn)
                    sync()
                    times.append(time.perf_counter() - t0)
                extra_mib = None
                if gpu:
                    student.grad = None
                    sync()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    run(fn)
                    sync()
                    extra_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                results[name] = dict(ms=statistics.median(times) * 1e3, extra=extra_mib, warmup_s=first_s,
                                     kept=kept_share)
            for name, r in results.items():
                rows.append((mode, batch, name, r, results))
            del student, on_target, on_surrogate, uncond
            if gpu:
                torch.cuda.empty_cache()

    header = (f"{'mode':<7}{'B':>4}  {'variant':<42}{'fwd+bwd ms':>12}{'x eager':>9}{'x compile':>11}"
              f"{'extra MiB':>11}{'% eager mem':>13}{'kept':>6}")
    print(header)
    print("-" * len(header))
    verdicts = []
    for mode, batch, name, r, group in rows:
        eager = group["eager"]
        interpreted = "interpreter" in name
        vs_eager = eager["ms"] / r["ms"]
        vs_compile = group["compile"]["ms"] / r["ms"] if "compile" in group and not interpreted else None
        mem_share = (r["extra"] / eager["extra"]) if (r["extra"] is not None and eager["extra"]) else None
        compile_text = f"{vs_compile:.2f}x" if vs_compile else "-"
        extra_text = f"{r['extra']:.1f}" if r["extra"] is not None else "n/a"
        share_text = f"{mem_share:.0%}" if mem_share is not None else "n/a"
        eager_text = "-" if interpreted else f"{vs_eager:.2f}x"
        print(f"{mode:<7}{batch:>4}  {name:<42}{r['ms']:>12.3f}{eager_text:>9}{compile_text:>11}"
              f"{extra_text:>11}{share_text:>13}{r['kept']:>6.0%}")
        if gpu and name == triton_label:
            ok = vs_eager >= GOAL_VS_EAGER and (vs_compile is None or vs_compile >= GOAL_VS_COMPILE) \
                and (mem_share is not None and mem_share <= GOAL_MEMORY_SHARE)
            verdicts.append(f"{mode} B={batch}: {'meets' if ok else 'MISSES'} the goal "
                            f"({vs_eager:.2f}x eager, {compile_text} compile, {share_text} of eager's extra memory)")
    if "compile" in variants:
        print("# compile: warmup includes compilation, timed calls do not; the reference graph-breaks once "
              "(number of windows read from the data)")
    for line in verdicts:
        print("# goal: " + line)
    if not gpu:
        print("# CPU run: the speed goals are GPU goals; memory is reported on CUDA only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
