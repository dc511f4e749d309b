"""Supervised image tokens/s of our erasure step vs two per-token loops, same model, one run.

- ours: teacher-forced targets for all positions in one pass per prompt, one student
  forward/backward, windows + threshold mask (sequence update); measured with the
  rollout tokens stored with the pair (as the VF step writes them) and with a fresh
  CFG rollout inside the step.
- official pattern: a re-creation of the official training loop's compute pattern:
  per image token three frozen single-token forwards (the CFG sampling forward with
  its unconditional row, the target prompt, the surrogate prompt) and one student
  single-token forward, each fed only the newest token with no KV cache (after the
  prompt), backward + optimizer step every window.
- per-token + KV cache: the correct per-token loop: the same four forwards per token,
  each with its KV cache, backward + step every window (cache detached at window ends).

    python benchmarks/bench_erase_step.py --grid 8 --window-len 16 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from ear_dist.config import EraseConfig, TrainableConfig
from ear_dist.models.janus import build_preset, position_ids_from_mask, unconditional_ids
from ear_dist.models.presets import tiny_config
from ear_dist.teacher.colocated import ColocatedTeacher
from ear_dist.train.step import ErasureStep, PairBatch, Updater
from ear_dist.train.student import make_student
from ear_dist.train.trainable import select_trainable_names

TARGETS = ["a photo of a church in a field", "a church at night by the sea"]
SURROGATES = ["a photo of a barn in a field", "a castle at night by the sea"]


def lm_step(model, embeds, mask, pos, cache=None):
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                     past_key_values=cache, use_cache=cache is not None)
    return out.last_hidden_state[:, -1]


def per_token_loop(bundle, student, opt, window_len: int, use_cache: bool) -> None:
    """Four single-token forwards per image token; backward + step every window."""
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
    for i in range(bundle.num_image_tokens):
        with torch.no_grad():
            cond, uncond = teacher.model.generation_head(h_t[b : 2 * b]), teacher.model.generation_head(h_t[2 * b :])
            nxt = (uncond + 5.0 * (cond - uncond)).argmax(-1)
            target = 2 * h_t[b : 2 * b] - h_t[:b]
        loss_acc = loss_acc + ((h_s_student - target) ** 2).mean(-1).sum()
        if (i + 1) % window_len == 0 or i == bundle.num_image_tokens - 1:
            if loss_acc.item() >= 0.0:
                (loss_acc / window_len).backward()
                opt.step()
                opt.zero_grad()
            loss_acc = 0.0
            if use_cache:  # the student cache from before this window is no longer differentiated
                for layer in s_cache.layers:
                    layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        tok_emb = bundle.model.prepare_embeddings_for_image_generation(nxt[:, None])
        pos_t, pos_s = pos_t + 1, pos_s + 1
        if use_cache:
            t_mask = torch.cat([t_mask, t_mask.new_ones(3 * b, 1)], 1)
            mask_t = torch.cat([mask_t, mask_t.new_ones(b, 1)], 1)
            with torch.no_grad():
                h_t = lm_step(teacher, tok_emb.repeat(3, 1, 1), t_mask, pos_t, t_cache)
            h_s_student = lm_step(student, tok_emb, mask_t, pos_s, s_cache)
        else:  # the official pattern: only the newest token, no context, one forward per role
            one = torch.ones(b, 1, dtype=torch.long)
            with torch.no_grad():
                lm_step(teacher, tok_emb, one, pos_s)  # the CFG sampling forward
                h_tt = lm_step(teacher, tok_emb, one, pos_s)  # target prompt
                h_ss = lm_step(teacher, tok_emb, one, pos_s)  # surrogate prompt
                h_t = torch.cat([h_tt, h_ss, h_ss])
            h_s_student = lm_step(student, tok_emb, one, pos_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=8, help="image tokens per side")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--window-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = tiny_config(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden,
                      grid_side=args.grid, codebook_size=256)
    bundle = build_preset("tiny", config=cfg, seed=0)
    names = select_trainable_names(bundle.model, TrainableConfig(first_k_layers=5, modules="attention"))
    teacher = ColocatedTeacher(bundle)
    student = make_student(bundle.model, names)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    step = ErasureStep(student, bundle, teacher,
                       EraseConfig(update_mode="sequence", window_len=args.window_len, loss_threshold=0.0),
                       Updater(opt))
    tokens = teacher.rollout(SURROGATES, [0, 1])
    b, t = tokens.shape
    stored = PairBatch(TARGETS, SURROGATES, ["church"] * 2, [0, 1], tokens)
    fresh = PairBatch(TARGETS, SURROGATES, ["church"] * 2, [0, 1])
    runs = {
        "ours (stored rollout)": lambda: step(stored),
        "ours (with CFG rollout)": lambda: step(fresh),
        "per-token + KV cache": lambda: per_token_loop(bundle, student, opt, args.window_len, True),
        "official pattern": lambda: per_token_loop(bundle, student, opt, args.window_len, False),
    }
    for fn in runs.values():
        fn()  # warm-up
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):  # interleaved: machine noise hits all alike
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    print(f"tiny Janus: hidden {args.hidden}, {args.layers} layers, {t} image tokens ({args.grid}x{args.grid}), "
          f"batch {b}, window {args.window_len}, CPU threads 1")
    print(f"{'loop':<26}{'ms/step':>10}{'sup. tok/s':>12}")
    for k, s in best.items():
        print(f"{k:<26}{s * 1e3:>10.1f}{b * t / s:>12.0f}")
    for ours in ("ours (stored rollout)", "ours (with CFG rollout)"):
        print(f"{ours}: {best['official pattern'] / best[ours]:.1f}x the official pattern, "
              f"{best['per-token + KV cache'] / best[ours]:.1f}x the per-token KV-cache loop")


if __name__ == "__main__":
    main()
