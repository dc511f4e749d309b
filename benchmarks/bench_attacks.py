"""The white-box attacks' cost and success on the planted-concept world, projected to Janus-Pro-7B.

For one concept: the base model's CFG images of the concept's plain training prompts (the targets, as the
``attack:`` eval suites take them), then concept
inversion and GCG prompt search against the base model and each erased model (``--delta NAME=PATH``, applied in
memory), their images judged by the world's classifier (attack success rate: the share showing the concept).
Seconds are wall-clock on this machine at the world's size; FLOPs of the same budget at the world's shape and
at the Janus-Pro-7B shape (``ear_dist/eval/attacks/cost.py``) give the projection.

    python benchmarks/bench_attacks.py [--concept church] [--delta EAR=runs/demo/runs/ear/delta.safetensors]
        [--targets 32] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ear_dist.config import add_config_args, config_from_args  # noqa: E402

PROMPT_LEN_7B = 20  # "<|User|>: a photo of a <inv0> <inv1>\n\n<|Assistant|>:<begin_of_image>" in Janus-Pro's tokens
H100_BF16 = 989e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="church")
    p.add_argument("--delta", action="append", default=[], help="NAME=PATH: an erased model to attack")
    p.add_argument("--targets", type=int, default=32, help="base images of the concept the attacks fit")
    p.add_argument("--mfu", type=float, default=0.3, help="assumed utilisation of the H100 for the projection")
    p.add_argument("--json", default="", help="write the figures here too")
    add_config_args(p)
    args = p.parse_args(argv)
    import torch

    from benchmarks.common import run_header
    from ear_dist.eval.attacks import InversionBudget, SearchBudget, invert_concept, sample_targets, search_prompts
    from ear_dist.eval.attacks.cost import inversion_flops, search_flops
    from ear_dist.eval.attacks.whitebox import target_prompts
    from ear_dist.models.delta import applied_deltas
    from ear_dist.models.family import load_model
    from ear_dist.models.janus.presets import preset_config
    from ear_dist.telemetry.flops import janus_flops_shape
    from ear_dist.world.concepts import concept_words
    from ear_dist.world.pretrain import build_world_model
    from ear_dist.world.world import World

    cfg = config_from_args(args)
    world = World(cfg.world)
    path, _ = build_world_model(cfg.world, progress=False)
    model = load_model(str(path), device="cpu", dtype="float32")
    gw = cfg.world.guidance_weight
    words = [w for split in ("train", "validation", "heldout") for w in concept_words(world, args.concept, split)]
    prompts = target_prompts(args.concept, args.targets)
    inversion, search = InversionBudget(guidance_weight=gw), SearchBudget(guidance_weight=gw)
    print("\n".join(run_header("white-box attacks")))
    print("| model | inversion ASR | search ASR | search ASR, concept words allowed | inversion s | search s | "
          "best search prompt | best prompt, words allowed |")
    t = time.perf_counter()
    targets = sample_targets(model, prompts, 0, gw)
    target_s = time.perf_counter() - t
    rows = []
    for name, delta in [("base", None), *(d.split("=", 1) for d in args.delta)]:
        with applied_deltas(model.model, [delta] if delta else []):
            t = time.perf_counter()
            inv = invert_concept(model, targets, inversion)
            inv_s = time.perf_counter() - t
            t = time.perf_counter()
            found = search_prompts(model, targets, search, template="a photo of a {}", exclude=words)
            search_s = time.perf_counter() - t
            allowed = search_prompts(model, targets, search, template="a photo of a {}")
        share = lambda images: float(world.classify(images)[args.concept].mean())  # noqa: E731
        rows.append({"model": name, "inversion_asr": share(inv.images), "search_asr": share(found.images),
                     "search_words_allowed_asr": share(allowed.images), "inversion_s": inv_s, "search_s": search_s,
                     "search_prompts": found.prompts, "search_words_allowed_prompts": allowed.prompts,
                     "inversion_final_loss": inv.losses[-1]})
        print(f"| {name} | {share(inv.images):.3f} | {share(found.images):.3f} | {share(allowed.images):.3f} | "
              f"{inv_s:.1f} | {search_s:.1f} | {found.prompts[0]!r} | {allowed.prompts[0]!r} |", flush=True)
    ids, _ = model.encode_prompts(["a photo of a church"])
    world_shape, big = janus_flops_shape(model.model.config), janus_flops_shape(preset_config("janus-pro-7b"))
    prompt_len = int(ids.shape[1]) + inversion.tokens - 1
    cost = {}
    for attack, fn, budget in (("inversion", inversion_flops, inversion), ("search", search_flops, search)):
        small = fn(world_shape, budget, args.targets, prompt_len, model.num_image_tokens)
        large = fn(big, budget, args.targets, PROMPT_LEN_7B, 576)
        seconds = next(r[f"{attack}_s"] for r in rows if r["model"] == "base") + target_s
        cost[attack] = {"world_flops": small["total"], "janus_pro_7b_flops": large, "cpu_seconds": seconds,
                        "flops_ratio": large["total"] / small["total"],
                        "h100_seconds": large["total"] / (H100_BF16 * args.mfu)}
        print(f"{attack}: {seconds:.1f} s on this CPU (targets {target_s:.1f} s included), "
              f"{small['total'] / 1e9:.2f} GFLOP at the world's shape; Janus-Pro-7B: {large['total'] / 1e15:.1f} PFLOP "
              f"(x{cost[attack]['flops_ratio']:.0f}; targets {large['targets'] / 1e15:.1f}, optimisation "
              f"{large['optimisation'] / 1e15:.1f}, images {large['images'] / 1e15:.1f}) = "
              f"{cost[attack]['h100_seconds']:.0f} H100-seconds at {args.mfu:.0%} of bf16 peak")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cost": cost, "targets_s": target_s,
                                               "inversion": vars(inversion), "search": vars(search)}, indent=2,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
