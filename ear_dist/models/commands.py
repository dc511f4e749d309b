"""``ear-dist generate``: prompts -> image tokens -> PNGs and a grid."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ear_dist.config import add_config_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample images from a Janus model (local path or preset)")
    p.add_argument("--model", default=None, help="model directory or preset (default: model.path of the config)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--out", required=True, help="output directory for PNGs, grid.png and tokens.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--images-per-prompt", type=int, default=1)
    add_config_args(p)
    p.set_defaults(func=run_generate)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def run_generate(args) -> int:
    from tqdm import tqdm

    from ear_dist.models.images import decode_tokens, make_grid, save_pngs
    from ear_dist.models.janus import load_janus
    from ear_dist.models.rollout import rollout

    cfg = config_from_args(args)
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    bundle = load_janus(args.model or cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.model.seed)
    r = cfg.rollout
    seeds = [args.seed + i for i in range(len(prompts))]
    t0 = time.perf_counter()
    chunks = []
    for s in tqdm(range(0, len(prompts), r.batch_size), desc="generating", unit="batch"):
        chunks.append(
            rollout(bundle, prompts[s : s + r.batch_size], r.cfg_weight, r.temperature, r.top_k, r.greedy,
                    seeds[s : s + r.batch_size])
        )
    import torch

    tokens = torch.cat(chunks)
    elapsed = time.perf_counter() - t0
    images = decode_tokens(bundle.model, tokens)
    out = Path(args.out)
    names = [f"{i:04d}-{_slug(p)}" for i, p in enumerate(prompts)]
    save_pngs(images, out, names)
    make_grid(images, labels=prompts).save(out / "grid.png")
    (out / "tokens.json").write_text(json.dumps(
        [{"prompt": p, "seed": s, "tokens": t.tolist()} for p, s, t in zip(prompts, seeds, tokens)]
    ))
    n_tok = tokens.numel()
    print(f"{len(prompts)} images, {n_tok} image tokens in {elapsed:.2f}s ({n_tok / elapsed:.0f} tok/s); "
          f"wrote {out}/grid.png and {len(prompts)} PNGs")
    return 0
