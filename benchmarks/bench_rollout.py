"""Rollout throughput: our CFG loops (eager, and the lean decode path) vs transformers' generate(generation_mode="image").

Same model, same prompts, same batch, greedy decoding, so every loop must produce the
same tokens (checked and printed). Image tokens/s per loop and the ratios to generate,
as the median (min-max) over interleaved repeats, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py --model tiny --batch 8 --repeats 5
    python benchmarks/bench_rollout.py --model janus-pro-7b --device cuda --dtype bfloat16 --batch 16 --lean cuda_graph
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
from transformers import GenerationConfig  # noqa: E402

from benchmarks.common import Stat, rate_stat, ratio_stat, run_header  # noqa: E402
from ear_dist.models.janus import load_janus  # noqa: E402
from ear_dist.models.janus.rollout import rollout_ids  # noqa: E402

EAGER, GENERATE = "ours, eager loop", "transformers generate"


def synthetic_prompt_ids(bundle, batch: int, length: int = 24):
    """Random prompt ids ending in begin-of-image (presets without a tokenizer)."""
    fmt = bundle.prompt_format
    vocab = bundle.model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 30000), (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = fmt.bos_token_id, fmt.boi_token_id
    return ids.to(bundle.device), torch.ones_like(ids).to(bundle.device)


def prompt_ids(bundle, batch: int):
    """``batch`` prompts: real sentences through the tokenizer, or random ids for shape-only presets."""
    if bundle.tokenizer is None:
        return synthetic_prompt_ids(bundle, batch)
    base = ["a photo of a church", "a red barn in a snowy field", "a castle at night", "a windmill by a lake"]
    return bundle.encode_prompts([base[i % len(base)] for i in range(batch)])


def sync_of(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@dataclass
class RolloutBench:
    """Seconds per batch of each loop, the tokens each produced, and loops that could not run."""

    image_tokens: int
    times: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def same_tokens(self, loop: str) -> Optional[bool]:
        """Whether ``loop`` gave the eager loop's tokens (None when either did not run)."""
        if loop not in self.tokens or EAGER not in self.tokens:
            return None
        return bool(torch.equal(self.tokens[loop].cpu(), self.tokens[EAGER].cpu()))

    def agreement(self, loop: str) -> Optional[float]:
        """The share of image tokens equal to the eager loop's (None when either did not run)."""
        if loop not in self.tokens or EAGER not in self.tokens:
            return None
        return float((self.tokens[loop].cpu() == self.tokens[EAGER].cpu()).float().mean())

    def rate(self, loop: str) -> Stat:
        return rate_stat(self.times[loop], self.image_tokens)

    def ratio(self, loop: str, baseline: str = GENERATE) -> Optional[Stat]:
        if loop not in self.times or baseline not in self.times:
            return None
        return ratio_stat(self.times[baseline], self.times[loop])


def measure_rollouts(bundle, ids, mask, guidance_weight: float = 5.0, lean: Optional[str] = None,
                     repeats: int = 3, with_generate: bool = True, warmup_tokens: Optional[int] = None
                     ) -> RolloutBench:
    """Time our eager loop, the lean path (``lean``: a rollout.decode mode, or ``uncaptured``: the
    graph's step run as is) and transformers' generate, interleaved, after one untimed call each.

    ``warmup_tokens``: the eager loop and generate warm up on this many image tokens instead
    of a whole image (the lean path always warms up on a whole one: that call captures or
    compiles its step); the tokens compared then come from the first timed repeat.
    """
    device = ids.device
    sync = sync_of(device)
    fmt = bundle.prompt_format

    def generation_config(tokens: int) -> GenerationConfig:
        return GenerationConfig(
            bos_token_id=fmt.bos_token_id, pad_token_id=fmt.pad_token_id,
            generation_kwargs={"boi_token_id": fmt.boi_token_id}, do_sample=False,
            max_new_tokens=tokens, guidance_scale=guidance_weight,
        )

    gc = generation_config(bundle.num_image_tokens)
    loops: dict[str, Callable[[], torch.Tensor]] = {
        EAGER: lambda: rollout_ids(bundle, ids, mask, guidance_weight=guidance_weight, greedy=True)}
    warmups: dict[str, Callable[[], torch.Tensor]] = {}
    if warmup_tokens:
        short = generation_config(warmup_tokens)
        warmups[EAGER] = lambda: rollout_ids(bundle, ids, mask, guidance_weight=guidance_weight, greedy=True,
                                             num_image_tokens=warmup_tokens)
        warmups[GENERATE] = lambda: bundle.model.generate(ids, attention_mask=mask, generation_mode="image",
                                                          generation_config=short)
    if lean is not None:
        if lean == "uncaptured":
            from ear_dist.models.janus.decode import lean_rollout_ids

            loops[f"ours, lean ({lean})"] = lambda: lean_rollout_ids(
                bundle, ids, mask, lean, guidance_weight, 1.0, 0, True, None, bundle.num_image_tokens)
        else:
            loops[f"ours, lean ({lean})"] = lambda: rollout_ids(bundle, ids, mask, guidance_weight=guidance_weight,
                                                                greedy=True, decode=lean)
    if with_generate:
        loops[GENERATE] = lambda: bundle.model.generate(ids, attention_mask=mask, generation_mode="image",
                                                        generation_config=gc)
    bench = RolloutBench(image_tokens=ids.shape[0] * bundle.num_image_tokens)
    for name, fn in list(loops.items()):  # the first call compiles or captures, and gives the tokens
        try:
            with torch.no_grad():
                out = warmups.get(name, fn)()
            if name not in warmups:
                bench.tokens[name] = out
        except Exception as e:  # e.g. a transformers release whose image generate is broken: say so
            bench.failed[name] = f"{type(e).__name__}: {e}"
            del loops[name]
    bench.times = {k: [] for k in loops}
    for _ in range(repeats):  # interleaved so machine noise hits all alike
        for name, fn in loops.items():
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync()
            bench.times[name].append(time.perf_counter() - t0)
            bench.tokens.setdefault(name, out)
    return bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance-weight", type=float, default=5.0)
    ap.add_argument("--lean", default=None, choices=["compiled", "cuda_graph", "uncaptured"],
                    help="also time the lean decode path in this mode (uncaptured: the CUDA graph's step, run as is)")
    args = ap.parse_args()
    print("\n".join(run_header("bench_rollout")))
    bundle = load_janus(args.model, device=args.device, dtype=args.dtype)
    ids, mask = prompt_ids(bundle, args.batch)
    bench = measure_rollouts(bundle, ids, mask, args.guidance_weight, args.lean, args.repeats)
    print(f"model={args.model} dtype={args.dtype} batch={args.batch} image_tokens={bundle.num_image_tokens} "
          f"cfg={args.guidance_weight}; median (min-max) of {args.repeats} interleaved repeats")
    for name, error in bench.failed.items():
        print(f"  {name}: did not run ({error})")
    for name in bench.times:
        same = "" if name == EAGER else f", same tokens as the eager loop: {bench.same_tokens(name)}"
        ms = Stat.of(bench.times[name]).scaled(1e3)
        print(f"  {name:<28} {ms.fmt('.1f', ' ms/batch'):>34}  {bench.rate(name).fmt(',.0f', ' image tok/s')}{same}")
    for name in bench.times:
        ratio = bench.ratio(name)
        if name != GENERATE and ratio is not None:
            print(f"  {name} / transformers generate (tokens/s): {ratio.fmt('.2f', 'x')}")


if __name__ == "__main__":
    main()
