"""Supervised image tokens/s of the erasure step on the VAR family vs a per-scale loop, same model, one run.

- ours: the real ``ErasureStep`` (EAR, hidden-state targets, one update per batch): the
  teacher's outputs on the target and surrogate prompts for every scale in one
  block-causal pass, one student forward/backward, windows of whole scales; with the
  rollout tokens stored with the pair and with a fresh CFG rollout inside the step; and
  S-VARE (bitwise filter + preservation KL) on stored tokens.
- per-scale loop: the same objective and the same single update, computed scale by
  scale as a sampler would: teacher and student each run one forward per scale with
  their KV caches, the per-scale losses summed, one backward and step at the end.

Before timing, the per-scale loop's loss is checked against the step's on the same
tokens (they compute the same number).

    python benchmarks/bench_var_step.py --repeats 3                       # tiny-var shape, CPU
    python benchmarks/bench_var_step.py --preset infinity-2b --device cuda --dtype bfloat16 --batch 1 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Stat, rate_stat, ratio_stat, run_header  # noqa: E402
from ear_dist.config import EraseConfig, TrainableConfig  # noqa: E402
from ear_dist.models.var.bsq import scale_bounds, teacher_forcing_inputs  # noqa: E402
from ear_dist.models.var.bundle import VarBundle, build_var_preset  # noqa: E402
from ear_dist.models.var.presets import tiny_var_config  # noqa: E402
from ear_dist.teacher.colocated import ColocatedTeacher  # noqa: E402
from ear_dist.train.step import ErasureStep, PairBatch, Updater  # noqa: E402
from ear_dist.train.student import make_student  # noqa: E402
from ear_dist.train.trainable import select_trainable_names  # noqa: E402

TARGETS = ["a photo of a church in a field", "a church at night by the sea", "a small church", "an old church"]
SURROGATES = ["a photo of a barn in a field", "a castle at night by the sea", "a small barn", "an old castle"]


class SyntheticText(VarBundle):
    """A shape-only preset has no tokenizer: prompts become fixed random T5 states (seeded by the prompt)."""

    prompt_len = 32

    def encode_prompts(self, prompts):
        states = [torch.randn(self.prompt_len, self.config.text_channels,
                              generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        mask = torch.ones(len(prompts), self.prompt_len, dtype=torch.long, device=self.device)
        return torch.stack(states).to(self.device, self.model.dtype), mask


def per_scale_loss(bundle, student, cond, mask, tokens) -> torch.Tensor:
    """The EAR hidden-state loss (eta 1), scale by scale with KV caches; the graph spans every scale."""
    cfg = bundle.config
    b = tokens.shape[0]
    teacher = bundle.model
    inputs = teacher_forcing_inputs(tokens, cfg.scales, cfg.bits)
    with torch.no_grad():
        t_text = teacher.encode_text(cond, mask)  # rows: targets, then surrogates
    s_text = student.encode_text(cond[:b], mask[:b])
    t_caches, s_caches = [[] for _ in range(cfg.depth)], [[] for _ in range(cfg.depth)]
    x_t, x_s = teacher.start_token(t_text), student.start_token(s_text)
    total = 0.0
    bounds = scale_bounds(cfg.scale_sizes)
    for k, (start, end) in enumerate(bounds):
        with torch.no_grad():
            h_t = teacher.run_blocks(x_t, t_text, start, caches=t_caches)
            target = h_t[b:] - (h_t[:b] - h_t[b:])
        h_s = student.run_blocks(x_s, s_text, start, caches=s_caches)
        total = total + (h_s.float() - target.float()).square().mean(-1).sum()
        if k + 1 < len(bounds):
            nxt = inputs[:, bounds[k + 1][0] - 1: bounds[k + 1][1] - 1].to(teacher.dtype)
            with torch.no_grad():
                x_t = teacher.word_embed(nxt).repeat(2, 1, 1)
            x_s = student.word_embed(nxt)
    return total / tokens.numel()


@dataclass
class VarStepBench:
    """One measurement: seconds per call of each loop, the tokens each supervises, and the loss check."""

    times: dict
    tokens: int
    step_loss: float
    loop_loss: float
    shape: str

    def ratios(self) -> dict:
        base = self.times[PER_SCALE]
        return {k: ratio_stat(base, self.times[k]) for k in (STORED, SVARE)}


STORED, FRESH, SVARE, PER_SCALE = ("ours (stored rollout)", "ours (with CFG rollout)", "ours, S-VARE (stored)",
                                   "per-scale loop + KV cache")


def build_bench_bundle(preset: str, device, dtype, config=None):
    """The preset's model with seeded random weights, built on ``device``; a shape-only preset gets synthetic
    text states (it has no tokenizer)."""
    built = build_var_preset(preset, config=config, device=device, dtype=dtype,
                             extra_words=" ".join(TARGETS + SURROGATES).split())
    if built.tokenizer is not None:
        return built
    return SyntheticText(built.model, built.text_encoder, None, built.decoder, built.name)


def measure_var_step(bundle, batch: int, first_k_layers: int, repeats: int, sync=lambda: None) -> VarStepBench:
    """Time the step (EAR stored / with rollout, S-VARE) against the per-scale loop, interleaved repeats."""
    names = select_trainable_names(bundle.model, TrainableConfig(first_k_layers=first_k_layers,
                                                                 modules="attention"))
    teacher = ColocatedTeacher(bundle)
    student = make_student(bundle.model, names)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    ear = ErasureStep(student, bundle, teacher, EraseConfig(update_mode="sequence", loss_threshold=0.0), Updater(opt))
    svare = ErasureStep(student, bundle, teacher, EraseConfig(method="svare"), Updater(opt))
    b = batch
    targets, surrogates = TARGETS[:b], SURROGATES[:b]
    tokens = teacher.rollout(_request(ear, targets, surrogates))
    stored = PairBatch(targets, surrogates, ["church"] * b, list(range(b)), tokens)
    fresh = PairBatch(targets, surrogates, ["church"] * b, list(range(b)))
    cond, mask = bundle.encode_prompts(targets + surrogates)

    def loop() -> None:
        loss = per_scale_loss(bundle, student, cond, mask, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()

    with torch.no_grad():  # the two compute one objective
        targets_out = teacher.forward_targets(_request(ear, targets, surrogates, tokens), tokens)
        ours = ear._loss(cond[:b], mask[:b], targets_out, ear._windows(tokens, _rows(ear, b, tokens.device)),
                         0.0, 1.0).loss
        theirs = per_scale_loss(bundle, student, cond, mask, tokens)
    runs = {STORED: lambda: ear(stored), FRESH: lambda: ear(fresh), SVARE: lambda: svare(stored), PER_SCALE: loop}
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved: machine noise hits all alike
        for k, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    cfg = bundle.config
    shape = (f"width {cfg.embed_dim}, {cfg.depth} blocks, scales {[s[0] for s in cfg.scales]} "
             f"({tokens.shape[1]} tokens of {cfg.bits} bits), batch {b}, first {first_k_layers} blocks' "
             f"self-attention trained")
    return VarStepBench(times, b * tokens.shape[1], ours.item(), theirs.item(), shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-var", choices=["tiny-var", "infinity-2b"])
    ap.add_argument("--hidden", type=int, default=128, help="tiny-var: width")
    ap.add_argument("--layers", type=int, default=4, help="tiny-var: blocks")
    ap.add_argument("--side", type=int, default=16, help="tiny-var: last scale's side (scales 1, 2, 4, ... side)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--first-k-layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print("\n".join(run_header("bench_var_step")))
    config = None
    if args.preset == "tiny-var":
        from ear_dist.world.var_world import var_scales

        config = tiny_var_config(embed_dim=args.hidden, depth=args.layers, ffn_hidden=2 * args.hidden,
                                 scales=var_scales(args.side))
    bundle = build_bench_bundle(args.preset, args.device, getattr(torch, args.dtype), config)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    bench = measure_var_step(bundle, args.batch, args.first_k_layers, args.repeats, sync)
    print(f"same objective: step loss {bench.step_loss:.6f}, per-scale loop loss {bench.loop_loss:.6f}")
    print(f"{args.preset}: {bench.shape}, {args.device} {args.dtype}; median (min-max) of {args.repeats} "
          f"interleaved repeats")
    print(f"{'step':<28}{'ms/step':>26}{'sup. tok/s':>26}")
    for k, ts in bench.times.items():
        print(f"{k:<28}{Stat.of(ts).scaled(1e3).fmt('.1f'):>26}{rate_stat(ts, bench.tokens).fmt(',.0f'):>26}")
    for k, ratio in bench.ratios().items():
        print(f"{k}: {ratio.fmt()}x the per-scale loop")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def _rows(step: ErasureStep, b: int, device):
    from ear_dist.train.step import RowSettings

    return RowSettings.of(step.cfg, ["church"] * b, device)


def _request(step, targets, surrogates, tokens=None):
    from ear_dist.teacher.base import TeacherRequest

    return TeacherRequest(step.settings, targets, surrogates, list(range(len(targets))), tokens)


if __name__ == "__main__":
    main()
