"""Where erasure damage comes from on the planted-concept world.

Erases "church" with the demo's settings (the real ``run_erase``) for a short and the
default number of steps, then measures on held-out no-style prompts of a few objects:

1. what the short run's model draws for each object's prompts (which objects the
   classifier finds, so swapped identities show);
2. the same objects after a RANDOM change of each trained tensor with the same norm as
   the short run's change (is it the size of the change or its direction?);
3. for the default run, the KL between the base and erased next-token distributions on
   the base model's own samples: conditional, unconditional, and after CFG.

    python benchmarks/world_damage.py [--short-steps 10] [--prompts 48] [--out runs/damage]
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

OBJECTS_SHOWN = ("barn", "theater", "castle", "church")


def _draws(world, bundle, n: int) -> dict:
    """Per object: how many of its n prompts' images show each object, and the hit rate."""
    from ear_dist.models.janus.rollout import rollout
    from ear_dist.world.grammar import OBJECTS

    out = {}
    for obj in OBJECTS_SHOWN:
        batch = world.sample(n, "heldout", stream=5, objects=[obj], styles=[None])
        tokens = rollout(bundle, batch.prompts, guidance_weight=world.config.guidance_weight, seeds=list(range(n)),
                         batch_size=n)
        shown = world.classify(tokens)
        out[obj] = {"hit_rate": round(float(shown[obj].mean()), 3),
                    "draws": {o: int(shown[o].sum()) for o in OBJECTS if shown[o].any()}}
    return out


def _kl(world, base, erased, n: int) -> dict:
    from ear_dist.models.janus import teacher_forced, unconditional_ids
    from ear_dist.models.janus.rollout import rollout

    w = world.config.guidance_weight
    out = {}
    for obj in OBJECTS_SHOWN:
        batch = world.sample(n, "heldout", stream=5, objects=[obj], styles=[None])
        tokens = rollout(base, batch.prompts, guidance_weight=w, seeds=list(range(n)), batch_size=n)
        ids, mask = base.encode_prompts(batch.prompts)
        logp = {}
        with torch.no_grad():
            for name, prompt_ids in (("cond", ids), ("uncond", unconditional_ids(ids, base.prompt_format))):
                logp[name] = [teacher_forced(m.model, prompt_ids, mask, tokens)[1].float().log_softmax(-1)
                              for m in (base, erased)]

        def kl(p, q):
            return round(float((p.exp() * (p - q)).sum(-1).mean()), 3)

        guided = [(w * c - (w - 1) * u).log_softmax(-1) for c, u in zip(logp["cond"], logp["uncond"])]
        out[obj] = {"cond": kl(*logp["cond"]), "uncond": kl(*logp["uncond"]), "cfg": kl(*guided)}
    return out


def run_damage(cfg0, short_steps: int = 10, prompts: int = 48, out: str = "runs/damage", log=print) -> None:
    """Erase "church" for ``short_steps`` and the demo's steps; print draws, a random-direction control, and KLs."""
    from ear_dist.config import load_config
    from ear_dist.data.pairs import PromptPair
    from ear_dist.models.janus import load_janus
    from ear_dist.models.delta import apply_deltas, load_delta
    from ear_dist.train.trainer import run_erase
    from ear_dist.world.erasure import WORLD_ERASE, make_pairs, visual_filter
    from ear_dist.world.pretrain import build_world_model
    from ear_dist.world.world import World

    model_path, info = build_world_model(cfg0.world, progress=True)
    from ear_dist.world.pretrain import refuse_missed_target

    refuse_missed_target(info, cfg0.world, f"the damage check ({model_path})")
    world = World(cfg0.world)
    base = load_janus(str(model_path), device="cpu", dtype="float32")
    kept, _ = visual_filter(world, base, make_pairs(world, "church", 32), "church")

    def erase(steps: int) -> str:
        cfg = load_config(overrides=["train.resume=never", f"model.path={model_path}",  # measured afresh
                                     f"train.out_dir={Path(out) / f'steps{steps}'}",
                                     "erase.concept=church", "model.device=cpu", *WORLD_ERASE,
                                     f"train.steps={steps}"])
        return run_erase(cfg, [PromptPair(**asdict(p)) for p in kept], progress=False)["delta"]

    def erased_model(delta: str):
        bundle = load_janus(str(model_path), device="cpu", dtype="float32")
        apply_deltas(bundle.model, [delta])
        return bundle

    short = erase(short_steps)
    log(f"base model, what each object's prompts draw: {_draws(world, base, prompts)}")
    log(f"after {short_steps} EAR steps: {_draws(world, erased_model(short), prompts)}")

    tensors, _ = load_delta(short)
    randomised = load_janus(str(model_path), device="cpu", dtype="float32")
    params = dict(randomised.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    ratios = []
    with torch.no_grad():
        for name, trained in tensors.items():
            change = trained.float() - params[name]
            ratios.append(float(change.norm() / params[name].norm()))
            noise = torch.randn(params[name].shape, generator=g)
            params[name].add_(noise * change.norm() / noise.norm())
    log(f"change / weight norm per trained tensor: {np.round(ratios, 3).tolist()}")
    log(f"random change of the same norms: {_draws(world, randomised, prompts)}")

    default_steps = load_config(overrides=WORLD_ERASE).train.steps
    full = erase(default_steps)
    log(f"KL(base || erased) after {default_steps} steps, on the base model's samples: "
          f"{_kl(world, base, erased_model(full), prompts)}")
