"""Forward + backward time and peak extra memory of the windowed, threshold-masked loss.

Compares, on the same inputs and in one run:
  eager    the plain-PyTorch reference (ear_dist.train.step_loss.reference_windowed_loss)
  compile  torch.compile of that reference
  triton   the fused kernels (ear_dist.kernels.windowed_fused)

GPU (the project's measurement; Janus-Pro-7B shapes are the defaults):
  python benchmarks/bench_loss_kernel.py --device cuda
CPU (runs at a small size; eager vs compile only, unless --interpret-triton, which
runs the kernels under the Triton interpreter: a correctness smoke run, not a speed figure):
  python benchmarks/bench_loss_kernel.py --device cpu [--interpret-triton]

"extra MiB" is the peak memory allocated during forward + backward above what was
allocated before (inputs), including the student's gradient; CUDA only (the CPU
allocator keeps no peak statistics). Project goal on GPU for the kernels: >= 2x eager
and >= 1.3x torch.compile in time, extra memory <= 25% of eager's. Times are the median
(min-max) over the repeats, interleaved across the variants; ratios are taken per repeat.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Stat, ratio_stat, run_header  # noqa: E402

TRITON, TRITON_INTERPRETED = "triton", "triton (interpreter; not a speed figure)"
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


@dataclass
class LossRow:
    """One variant at one (mode, batch): fwd+bwd seconds per repeat, peak extra memory, share of windows kept."""

    mode: str
    batch: int
    variant: str
    seconds: list
    extra_mib: Optional[float]
    kept: float
    first_call_s: float  # warm-up, compilation included

    @property
    def ms(self) -> Stat:
        return Stat.of(self.seconds).scaled(1e3)


def loss_variants(device, block_size=None, compile_reference=True, interpret_triton=False) -> dict:
    """eager (the reference), its torch.compile, and the fused Triton kernels where they can run."""
    import torch

    from ear_dist.train.step_loss import reference_windowed_loss, triton_available

    # the reference reads the number of windows from the data (a graph break under
    # torch.compile, by design); keep the log to this one line instead of dynamo's warning
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    variants = {"eager": reference_windowed_loss}
    if compile_reference:
        variants["compile"] = torch.compile(reference_windowed_loss)
    gpu = torch.device(device).type == "cuda"
    if (gpu and triton_available()) or interpret_triton:
        from ear_dist.kernels.windowed_fused import fused_windowed_loss

        label = TRITON if gpu else TRITON_INTERPRETED
        variants[label] = functools.partial(fused_windowed_loss, block_size=block_size)
    return variants


def measure_loss(device, dtype, variants: dict, modes, batch_sizes, tokens: int, vocab: int, hidden: int,
                 window_len: int = 48, kept_fraction: float = 0.5, teacher_cfg: bool = False, warmup: int = 1,
                 repeats: int = 3) -> list:
    """Forward + backward of every variant on the same inputs, repeats interleaved across variants."""
    import torch

    from ear_dist.losses.windowed_reference import window_index
    from ear_dist.train.step_loss import reference_windowed_loss

    device = torch.device(device)
    gpu = device.type == "cuda"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    rows = []
    for mode in modes:
        width = vocab if mode == "logit" else hidden
        for batch in batch_sizes:
            g = torch.Generator(device="cpu").manual_seed(batch)
            shape = (batch, tokens, width)

            def make(scale=1.0):
                return (scale * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)

            student = make().requires_grad_(True)
            on_target, on_surrogate = make(), make()
            uncond = make() if (teacher_cfg and mode == "logit") else None
            guidance_weight = 5.0 if uncond is not None else 0.0
            idx = window_index(batch, tokens, window_len, device=device)
            # a threshold at the (1 - kept_fraction) quantile of the window sums
            with torch.no_grad():
                probe = reference_windowed_loss(mode, student, on_target, on_surrogate, idx, 0.0, 1.0,
                                                uncond=uncond, guidance_weight=guidance_weight)
                threshold = _threshold_keeping(probe.window_loss[probe.window_exists].float().cpu(), kept_fraction)
            del probe

            def run(fn):
                student.grad = None
                out = fn(mode, student, on_target, on_surrogate, idx, threshold, 1.0,
                         uncond=uncond, guidance_weight=guidance_weight)
                out.loss.backward()
                return out

            first, kept, extra = {}, {}, {}
            for name, fn in variants.items():
                t_first = time.perf_counter()
                for _ in range(max(warmup, 1)):
                    out = run(fn)
                sync()
                first[name] = time.perf_counter() - t_first
                kept[name] = out.num_kept / max(out.num_windows, 1)
                del out
                extra[name] = None
                if gpu:
                    student.grad = None
                    sync()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    run(fn)
                    sync()
                    extra[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            times = {name: [] for name in variants}
            for _ in range(repeats):  # interleaved: machine noise hits every variant alike
                for name, fn in variants.items():
                    sync()
                    t0 = time.perf_counter()
                    run(fn)
                    sync()
                    times[name].append(time.perf_counter() - t0)
            for name in variants:
                rows.append(LossRow(mode, batch, name, times[name], extra[name], kept[name], first[name]))
            del student, on_target, on_surrogate, uncond
            if gpu:
                torch.cuda.empty_cache()
    return rows


def loss_verdicts(rows: list) -> dict:
    """Per Triton row (on a GPU): its speed-ups (per repeat) and memory share against eager and compile."""
    out = {}
    for r in rows:
        if r.variant != TRITON:
            continue
        group = {x.variant: x for x in rows if (x.mode, x.batch) == (r.mode, r.batch)}
        vs_eager = ratio_stat(group["eager"].seconds, r.seconds)
        vs_compile = ratio_stat(group["compile"].seconds, r.seconds) if "compile" in group else None
        eager_extra = group["eager"].extra_mib
        share = r.extra_mib / eager_extra if r.extra_mib is not None and eager_extra else None
        ok = (vs_eager.median >= GOAL_VS_EAGER and (vs_compile is None or vs_compile.median >= GOAL_VS_COMPILE)
              and share is not None and share <= GOAL_MEMORY_SHARE)
        out[(r.mode, r.batch)] = {"vs_eager": vs_eager, "vs_compile": vs_compile, "memory_share": share, "meets": ok}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_triton:
        if args.device != "cpu":
            print("--interpret-triton is for --device cpu", file=sys.stderr)
            return 2
        # must be set before triton creates the kernels
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from ear_dist.train.step_loss import triton_available

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    import importlib.metadata as md

    print("\n".join(run_header("bench_loss_kernel")))
    print(f"# triton {md.version('triton') if triton_available() else 'absent'}; T={args.tokens} V={args.vocab} "
          f"H={args.hidden} dtype={args.dtype} window_len={args.window_len} kept~{args.kept_fraction:.0%} "
          f"teacher_cfg={args.teacher_cfg} warmup={args.warmup} repeats={args.repeats} "
          f"block_size={args.block_size or 'auto'}; times: median (min-max) over the repeats")
    variants = loss_variants(device, args.block_size, not args.no_compile, args.interpret_triton)
    rows = measure_loss(device, getattr(torch, args.dtype), variants, args.modes, args.batch_sizes, args.tokens,
                        args.vocab, args.hidden, args.window_len, args.kept_fraction, args.teacher_cfg, args.warmup,
                        args.repeats)

    header = (f"{'mode':<7}{'B':>4}  {'variant':<42}{'fwd+bwd ms':>26}{'x eager':>9}{'x compile':>11}"
              f"{'extra MiB':>11}{'% eager mem':>13}{'kept':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        group = {x.variant: x for x in rows if (x.mode, x.batch) == (r.mode, r.batch)}
        interpreted = r.variant == TRITON_INTERPRETED
        vs_eager = ratio_stat(group["eager"].seconds, r.seconds).median
        vs_compile = ratio_stat(group["compile"].seconds, r.seconds).median \
            if "compile" in group and not interpreted else None
        eager_extra = group["eager"].extra_mib
        share = r.extra_mib / eager_extra if r.extra_mib is not None and eager_extra else None
        compile_text = f"{vs_compile:.2f}x" if vs_compile else "-"
        extra_text = f"{r.extra_mib:.1f}" if r.extra_mib is not None else "n/a"
        share_text = f"{share:.0%}" if share is not None else "n/a"
        eager_text = "-" if interpreted else f"{vs_eager:.2f}x"
        print(f"{r.mode:<7}{r.batch:>4}  {r.variant:<42}{r.ms.fmt('.3f'):>26}{eager_text:>9}{compile_text:>11}"
              f"{extra_text:>11}{share_text:>13}{r.kept:>6.0%}")
    if "compile" in variants:
        print("# compile: warmup includes compilation, timed calls do not; the reference graph-breaks once "
              "(number of windows read from the data)")
    for (mode, batch), v in loss_verdicts(rows).items():
        share = "n/a" if v["memory_share"] is None else f"{v['memory_share']:.0%}"
        compile_text = "-" if v["vs_compile"] is None else v["vs_compile"].fmt(".2f", "x")
        print(f"# goal: {mode} B={batch}: {'meets' if v['meets'] else 'MISSES'} the goal "
              f"({v['vs_eager'].fmt('.2f', 'x')} eager, {compile_text} compile, {share} of eager's extra memory)")
    if not gpu:
        print("# CPU run: the speed goals are GPU goals; memory is reported on CUDA only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
