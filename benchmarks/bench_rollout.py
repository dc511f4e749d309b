"""Rollout throughput: our CFG loop (static KV cache) vs transformers' generate(generation_mode="image").

Same model, same prompts, same batch, greedy decoding (so both produce the same tokens,
which is checked). Prints image tokens/s for each and the ratio, measured in one run.

    python benchmarks/bench_rollout.py --model tiny --batch 8 --repeats 5
    python benchmarks/bench_rollout.py --model janus-pro-7b --device cuda --dtype bfloat16 --batch 16   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from ear_dist.models.janus import load_janus
from ear_dist.models.rollout import rollout_ids


def synthetic_prompt_ids(bundle, batch: int, length: int = 24):
    """Random prompt ids ending in begin-of-image (presets without a tokenizer)."""
    fmt = bundle.prompt_format
    vocab = bundle.model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 30000), (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = fmt.bos_token_id, fmt.boi_token_id
    return ids.to(bundle.device), torch.ones_like(ids).to(bundle.device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance-weight", type=float, default=5.0)
    args = ap.parse_args()

    bundle = load_janus(args.model, device=args.device, dtype=args.dtype)
    device = bundle.device
    if bundle.tokenizer is not None:
        base = ["a photo of a church", "a red barn in a snowy field", "a castle at night", "a windmill by a lake"]
        ids, mask = bundle.encode_prompts([base[i % len(base)] for i in range(args.batch)])
    else:
        ids, mask = synthetic_prompt_ids(bundle, args.batch)
    fmt = bundle.prompt_format
    gc = GenerationConfig(
        bos_token_id=fmt.bos_token_id, pad_token_id=fmt.pad_token_id,
        generation_kwargs={"boi_token_id": fmt.boi_token_id}, do_sample=False,
        max_new_tokens=bundle.num_image_tokens, guidance_scale=args.guidance_weight,
    )

    def ours():
        return rollout_ids(bundle, ids, mask, guidance_weight=args.guidance_weight, greedy=True)

    def theirs():
        return bundle.model.generate(ids, attention_mask=mask, generation_mode="image", generation_config=gc)

    same = torch.equal(ours(), theirs())  # also warms both up
    times = {"ours": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved so machine noise hits both alike
        for name, fn in (("ours", ours), ("transformers", theirs)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    n_tok = args.batch * bundle.num_image_tokens
    best = {k: min(v) for k, v in times.items()}
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"model={args.model} device={dev_name} dtype={args.dtype} batch={args.batch} "
          f"image_tokens={bundle.num_image_tokens} cfg={args.guidance_weight} same_tokens={same}")
    for k in ("ours", "transformers"):
        print(f"  {k:<13} {best[k] * 1e3:9.1f} ms/batch  {n_tok / best[k]:10.0f} image tok/s")
    print(f"  ratio ours/transformers (tokens/s): {best['transformers'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
