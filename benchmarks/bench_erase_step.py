"""Supervised image tokens/s of our erasure step vs two per-token loops, same model, one run.

- ours: teacher-forced targets for all positions in one pass per prompt, one student
  forward/backward, windows + threshold mask; measured with the rollout tokens stored
  with the pair (as the VF step writes them) and with a fresh CFG rollout inside the
  step. ``--modes`` adds the paper's per-window updates (``window``: exact, the prefix
  recomputed for every window; ``window-cached``: from the cached prefix).
- official pattern: a re-creation of the official training loop's compute pattern:
  per image token three frozen single-token forwards (the CFG sampling forward with
  its unconditional row, the target prompt, the surrogate prompt) and one student
  single-token forward, each fed only the newest token with no KV cache (after the
  prompt), backward + optimizer step every window.
- per-token + KV cache: the correct per-token loop: the same four forwards per token,
  each with its KV cache, backward + step every window (cache detached at window ends).

Every figure is the median over ``--repeats`` interleaved runs with the min and max
beside it; ratios are taken per repeat.

    OMP_NUM_THREADS=1 python benchmarks/bench_erase_step.py --grid 8 --window-len 16 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from benchmarks.common import Stat, rate_stat, ratio_stat, run_header  # noqa: E402
from ear_dist.config import EraseConfig, RolloutConfig, TrainableConfig  # noqa: E402
from ear_dist.models.janus import build_preset, position_ids_from_mask, unconditional_ids  # noqa: E402
from ear_dist.models.janus.presets import tiny_config  # noqa: E402
from ear_dist.teacher.base import TeacherRequest, TeacherSettings  # noqa: E402
from ear_dist.teacher.colocated import ColocatedTeacher  # noqa: E402
from ear_dist.train.step import ErasureStep, PairBatch, Updater  # noqa: E402
from ear_dist.train.student import make_student  # noqa: E402
from ear_dist.train.trainable import select_trainable_names  # noqa: E402

TARGETS = ["a photo of a church in a field", "a church at night by the sea"]
SURROGATES = ["a photo of a barn in a field", "a castle at night by the sea"]
OURS_STORED, OURS_ROLLOUT = "ours (stored rollout)", "ours (with CFG rollout)"
KV_LOOP, OFFICIAL = "per-token + KV cache", "official pattern"
# our step's update modes: erase.update_mode, erase.window_prefix
MODES = {"sequence": ("sequence", "recompute"), "window": ("window", "recompute"),
         "window-cached": ("window", "cached")}


def lm_step(model, embeds, mask, pos, cache=None):
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                     past_key_values=cache, use_cache=cache is not None)
    return out.last_hidden_state[:, -1]


def per_token_loop(bundle, student, opt, window_len: int, use_cache: bool, num_tokens: Optional[int] = None) -> None:
    """Four single-token forwards per image token; backward + step every window.

    ``num_tokens``: stop after this many image tokens (default all): the per-token cost is
    flat without a cache and grows with it, so timing the first windows and scaling to the
    full length underestimates these loops' time, never ours.
    """
    teacher = bundle.model
    fmt = bundle.prompt_format
    ids, mask = bundle.encode_prompts(TARGETS + SURROGATES)
    b = len(TARGETS)
    ids_t, ids_s, mask_t, mask_s = ids[:b], ids[b:], mask[:b], mask[b:]
    # rows: [target, surrogate, uncond-of-surrogate] for the teacher; target for the student
    t_ids = torch.cat([ids_t, ids_s, unconditional_ids(ids_s, fmt)])
    t_mask = torch.cat([mask_t, mask_s, mask_s])
    t_cache = DynamicCache() if use_cache else None
    s_cache = DynamicCache() if use_cache else None
    emb = teacher.get_input_embeddings()
    with torch.no_grad():
        h_t = lm_step(teacher, emb(t_ids), t_mask, position_ids_from_mask(t_mask), t_cache)
    h_s_student = lm_step(student, emb(ids_t), mask_t, position_ids_from_mask(mask_t), s_cache)
    pos_t = position_ids_from_mask(t_mask)[:, -1:]
    pos_s = position_ids_from_mask(mask_t)[:, -1:]
    loss_acc = 0.0
    total = num_tokens or bundle.num_image_tokens
    for i in range(total):
        with torch.no_grad():
            cond, uncond = teacher.model.generation_head(h_t[b : 2 * b]), teacher.model.generation_head(h_t[2 * b :])
            nxt = (uncond + 5.0 * (cond - uncond)).argmax(-1)
            target = 2 * h_t[b : 2 * b] - h_t[:b]
        loss_acc = loss_acc + ((h_s_student - target) ** 2).mean(-1).sum()
        if (i + 1) % window_len == 0 or i == total - 1:
            if loss_acc.item() >= 0.0:
                (loss_acc / window_len).backward()
                opt.step()
                opt.zero_grad()
            loss_acc = 0.0
            if use_cache:  # the student cache from before this window is no longer differentiated
                for layer in s_cache.layers:
                    layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        if i == total - 1:
            break
        tok_emb = bundle.model.prepare_embeddings_for_image_generation(nxt[:, None])
        pos_t, pos_s = pos_t + 1, pos_s + 1
        if use_cache:
            t_mask = torch.cat([t_mask, t_mask.new_ones(3 * b, 1)], 1)
            mask_t = torch.cat([mask_t, mask_t.new_ones(b, 1)], 1)
            with torch.no_grad():
                h_t = lm_step(teacher, tok_emb.repeat(3, 1, 1), t_mask, pos_t, t_cache)
            h_s_student = lm_step(student, tok_emb, mask_t, pos_s, s_cache)
        else:  # the official pattern: only the newest token, no context, one forward per role
            one = torch.ones(b, 1, dtype=torch.long, device=tok_emb.device)
            with torch.no_grad():
                lm_step(teacher, tok_emb, one, pos_s)  # the CFG sampling forward
                h_tt = lm_step(teacher, tok_emb, one, pos_s)  # target prompt
                h_ss = lm_step(teacher, tok_emb, one, pos_s)  # surrogate prompt
                h_t = torch.cat([h_tt, h_ss, h_ss])
            h_s_student = lm_step(student, tok_emb, one, pos_s)


@dataclass
class StepBench:
    """The loops compared, each a callable, with the image tokens one call supervises."""

    runs: dict[str, Callable[[], None]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def step_bench(bundle, window_len: int, modes=("sequence",), first_k_layers: int = 5, decode: str = "eager",
               baseline_tokens: Optional[int] = None, lr: float = 1e-5) -> StepBench:
    """Our step (stored rollouts, one row per mode in ``modes``; and sequence mode with the CFG
    rollout inside) and the two per-token loops (``baseline_tokens``: their first tokens only),
    all on ``bundle`` with one student."""
    names = select_trainable_names(bundle.model, TrainableConfig(first_k_layers=first_k_layers, modules="attention"))
    teacher = ColocatedTeacher(bundle)
    student = make_student(bundle.model, names)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    settings = TeacherSettings.from_config(EraseConfig(), RolloutConfig(greedy=True, decode=decode))
    tokens = teacher.rollout(TeacherRequest(settings, TARGETS, SURROGATES, [0, 1]))
    b, t = tokens.shape
    stored = PairBatch(TARGETS, SURROGATES, ["church"] * b, [0, 1], tokens)
    fresh = PairBatch(TARGETS, SURROGATES, ["church"] * b, [0, 1])
    bench = StepBench()

    def ours(mode: str, batch: PairBatch):
        update_mode, prefix = MODES[mode]
        cfg = EraseConfig(update_mode=update_mode, window_prefix=prefix, window_len=window_len, loss_threshold=0.0)
        step = ErasureStep(student, bundle, teacher, cfg, Updater(opt), settings=settings)
        return lambda: step(batch)

    for mode in modes:
        label = OURS_STORED if mode == "sequence" else f"ours, {mode} updates (stored rollout)"
        bench.runs[label], bench.tokens[label] = ours(mode, stored), b * t
    bench.runs[OURS_ROLLOUT], bench.tokens[OURS_ROLLOUT] = ours("sequence", fresh), b * t
    n = min(baseline_tokens or t, t)
    bench.runs[KV_LOOP] = lambda: per_token_loop(bundle, student, opt, window_len, True, n)
    bench.runs[OFFICIAL] = lambda: per_token_loop(bundle, student, opt, window_len, False, n)
    bench.tokens[KV_LOOP] = bench.tokens[OFFICIAL] = b * n
    return bench


def time_runs(runs: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None] = lambda: None,
              warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each run, ``repeats`` interleaved rounds (after one warm-up call each)."""
    if warmup:
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved: machine noise hits all alike
        for k, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def speedups(bench: StepBench, times: dict[str, list[float]]) -> dict[str, dict[str, Stat]]:
    """Per row of ours: its supervised-token rate over each per-token loop's, per repeat."""
    out = {}
    for ours in (k for k in bench.runs if k.startswith("ours")):
        out[ours] = {}
        for loop in (OFFICIAL, KV_LOOP):
            # rate ratio = (tokens_ours / t_ours) / (tokens_loop / t_loop)
            per_token = [t_loop / bench.tokens[loop] for t_loop in times[loop]]
            mine = [t / bench.tokens[ours] for t in times[ours]]
            out[ours][loop] = ratio_stat(per_token, mine)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=8, help="image tokens per side")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--window-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="sequence", help=f"comma list of {', '.join(MODES)} (stored rollouts)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: {', '.join(unknown)} not in {', '.join(MODES)}")
    print("\n".join(run_header("bench_erase_step")))
    cfg = tiny_config(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden,
                      grid_side=args.grid, codebook_size=256)
    bundle = build_preset("tiny", config=cfg, seed=0)
    bench = step_bench(bundle, args.window_len, modes)
    times = time_runs(bench.runs, args.repeats)
    t = bundle.num_image_tokens
    print(f"tiny Janus: hidden {args.hidden}, {args.layers} layers, {t} image tokens ({args.grid}x{args.grid}), "
          f"batch {len(TARGETS)}, window {args.window_len}, CPU threads 1; median (min-max) of {args.repeats} "
          "interleaved repeats")
    print(f"{'loop':<44}{'ms/step':>26}{'supervised tok/s':>28}")
    for k, secs in times.items():
        ms = Stat.of(secs).scaled(1e3)
        print(f"{k:<44}{ms.fmt('.1f'):>26}{rate_stat(secs, bench.tokens[k]).fmt(',.0f'):>28}")
    for ours, ratios in speedups(bench, times).items():
        print(f"{ours}: {ratios[OFFICIAL].fmt('.1f', 'x')} the official pattern, "
              f"{ratios[KV_LOOP].fmt('.1f', 'x')} the per-token KV-cache loop")


if __name__ == "__main__":
    main()
