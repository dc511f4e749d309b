"""Peak memory of one erasure step in logit mode: the fused loss on the training path vs before.

Before (the first landing), the step built the guided target ``[B, T, V]`` itself, in
the model's dtype (plus its temporaries, and two CFG-combined copies with teacher-side
guidance), and handed it to the loss with eta = 0. Now the step hands the teacher's raw
outputs to the loss, and the Triton kernels build the target in registers. Each variant
runs the real ``ErasureStep`` (sequence update, stored rollouts) in a fresh process;
the figure is the growth of the process's peak resident memory (VmHWM, reset just
before the step) over its resident memory at that point.

    python benchmarks/bench_step_memory.py [--pairs 8] [--codebook 16384] [--grid 8] [--repeats 3]

On a CPU the kernels run under TRITON_INTERPRET=1 (set here), which is a correctness
mode, not a speed one; memory is what is compared. The 7B-shape figures are computed
from the formula printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("before: step-built target", "fused: raw outputs", "torch reference")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _one(variant: str, pairs: int, codebook: int, grid: int, teacher_guidance: float) -> dict:
    """Run one step of ``variant`` in this process; returns the peak growth in MiB."""
    import torch

    from ear_dist.config import EraseConfig
    from ear_dist.losses.windowed_reference import guidance_combine, guided_target
    from ear_dist.models.janus import build_preset
    from ear_dist.models.janus.presets import tiny_config
    from ear_dist.teacher.colocated import ColocatedTeacher
    from ear_dist.train.step_loss import windowed_loss
    from ear_dist.train.step import ErasureStep, PairBatch, Updater
    from ear_dist.train.student import make_student
    from ear_dist.train.trainable import select_trainable_names
    from ear_dist.config import TrainableConfig

    class StepBuildingTheTarget(ErasureStep):
        """The first landing's step: the guided target materialised, then the loss with eta = 0."""

        def _loss(self, ids, mask, teach, windows, threshold, eta, scale=None):
            n = windows.shape[1]
            on_t, on_s = teach.on_target[:, :n], teach.on_surrogate[:, :n]
            if teach.uncond is not None:
                w = self.settings.target_guidance_weight
                on_t = guidance_combine(on_t, teach.uncond[:, :n], w)
                on_s = guidance_combine(on_s, teach.uncond[:, :n], w)
            target = guided_target(on_t, on_s, eta.to(on_t.dtype).view(-1, 1, 1)).detach()
            del on_t, on_s
            student = self._student_out(ids, mask, teach.tokens[:, :n])
            return windowed_loss("logit", student, target, target, windows, threshold, 0.0, scale=scale,
                                 backend=self.cfg.loss_backend)

    torch.manual_seed(0)
    bundle = build_preset("tiny", seed=0, config=tiny_config(grid_side=grid, codebook_size=codebook))
    names = select_trainable_names(bundle.model, TrainableConfig(first_k_layers=2))
    teacher = ColocatedTeacher(bundle)
    student = make_student(bundle.model, names)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    backend = "torch" if variant == "torch reference" else "triton"
    cfg = EraseConfig(target_mode="logit", update_mode="sequence", window_len=16, loss_threshold=0.0,
                      loss_backend=backend, teacher_guidance_weight=teacher_guidance)
    step_cls = StepBuildingTheTarget if variant.startswith("before") else ErasureStep
    from ear_dist.config import RolloutConfig
    from ear_dist.teacher.base import TeacherSettings

    step = step_cls(student, bundle, teacher, cfg, Updater(opt), settings=TeacherSettings.from_config(cfg,
                                                                                                      RolloutConfig()))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, codebook, (pairs, grid * grid), generator=g)
    batch = PairBatch([f"a photo of a church {i}" for i in range(pairs)],
                      [f"a photo of a barn {i}" for i in range(pairs)], ["church"] * pairs, list(range(pairs)), tokens)
    step(batch)  # warm-up: allocator pools, interpreter caches
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    start = _rss_kb("VmRSS")
    result = step(batch)
    peak = _rss_kb("VmHWM")
    return {"variant": variant, "peak_growth_mib": (peak - start) / 1024, "loss": result.loss}


def _formula(pairs: int, tokens: int = 576, vocab: int = 16384, bytes_per: int = 2, guided: bool = False) -> dict:
    """Bytes the step-built target took at a shape: the target itself and its construction temporaries."""
    btv = pairs * tokens * vocab * bytes_per
    # target = s - eta (t - s): (t - s), eta * (t - s), the result: 3 live at the peak, 1 kept
    # through the loss; with teacher-side guidance two combined copies (+ their temporaries) come first
    peak_extra = (3 + (2 if guided else 0)) * btv
    return {"pairs": pairs, "btv_mib": btv / 2**20, "kept_mib": btv / 2**20, "peak_extra_mib": peak_extra / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--codebook", type=int, default=16384)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--teacher-guidance", type=float, default=0.0, help="erase.teacher_guidance_weight (0 = off)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one, args.pairs, args.codebook, args.grid, args.teacher_guidance)))
        return
    from benchmarks.common import run_header

    print("\n".join(run_header("bench_step_memory")))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    results: dict = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS:  # interleaved, each in a fresh process
            out = subprocess.run([sys.executable, __file__, "--one", v, "--pairs", str(args.pairs), "--codebook",
                                  str(args.codebook), "--grid", str(args.grid), "--teacher-guidance",
                                  str(args.teacher_guidance)], env=env, capture_output=True, text=True, check=True)
            results[v].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"])
    btv = args.pairs * args.grid ** 2 * args.codebook * 4 / 2**20
    print(f"logit-mode step, {args.pairs} pairs x {args.grid ** 2} tokens x {args.codebook} codes, fp32 "
          f"(one [B, T, V] tensor = {btv:.1f} MiB), teacher guidance {args.teacher_guidance}, {args.repeats} repeats")
    print("| variant | peak RSS growth of one step, MiB: median (min-max) |\n|---|---|")
    for v, xs in results.items():
        print(f"| {v} | {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}) |")
    saved = statistics.median(results[VARIANTS[0]]) - statistics.median(results[VARIANTS[1]])
    print(f"fused vs before: {saved:.1f} MiB less at the peak ({saved / btv:.2f} x one [B, T, V] fp32 tensor)")
    print("\n7B shape (T=576, V=16384, bf16), what the step-built target cost per step:")
    for pairs in (1, 4, 16):
        for guided in (False, True):
            f = _formula(pairs, guided=guided)
            print(f"  {pairs:2d} pair(s), teacher guidance {'on ' if guided else 'off'}: {f['kept_mib']:.0f} MiB held "
                  f"through the loss, {f['peak_extra_mib']:.0f} MiB at the peak of building it")


if __name__ == "__main__":
    main()
