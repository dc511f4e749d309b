"""Where a concept's synonyms meet inside a Janus world model, and how much of that the null space leaves free.

For each world build: the hidden states at the object word of "a photo of a W in a field" (church,
chapel, cathedral, and the other objects), their cosine per layer; then, for each layer's attention
input (q/k/v) and MLP down-projection input, the share of the word's and the image positions' features
outside the span holding ``--energy`` of the anchors' input energy (what a null-space update may act on)
and the cosine of those free parts between church and each synonym. The anchors are the ones the world's
preserving methods use (the training prompts of the other concepts, their teacher rollouts, cond and
uncond), so the projection is the one a run computes. README: "Synonyms: the first layer frozen".

    python benchmarks/synonym_features.py --world-seeds 0,1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WORDS = ("church", "chapel", "cathedral", "cinema", "theater", "barn", "castle", "lighthouse", "windmill")


def _cos(rows: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(rows, dim=-1)
    return unit @ unit.T


def report(world_seed: int, energy: float, log=print) -> None:
    from ear_dist.config import load_config
    from ear_dist.models.family import load_model
    from ear_dist.train.adapters import input_second_moments, null_space_projector
    from ear_dist.train.preserve import student_logits
    from ear_dist.world.erasure import PRESERVE_ANCHORS, anchor_prompts
    from ear_dist.world.pretrain import build_world_model
    from ear_dist.world.var_world import world_for

    cfg = load_config(overrides=[f"world.seed={world_seed}"])
    path, _ = build_world_model(cfg.world, progress=True)
    bundle = load_model(str(path), "janus", device="cpu", dtype="float32")
    world = world_for(cfg.world, "janus")
    g = cfg.world.guidance_weight

    ids, mask = bundle.encode_prompts([f"a photo of a {w} in a field" for w in WORDS])
    word = [j for j in range(ids.shape[1]) if len(set(ids[:, j].tolist())) > 1]
    if len(word) != 1:
        raise SystemExit(f"expected the words to differ in one token position, got {word}")
    word = word[0]
    with torch.no_grad():
        out = bundle.model.model.language_model(inputs_embeds=bundle.model.get_input_embeddings()(ids),
                                                attention_mask=mask, output_hidden_states=True)
    log(f"world seed {world_seed} ({path}): cosine at the word, church against chapel / cathedral / others (max)")
    for layer, hidden in enumerate(out.hidden_states):
        c = _cos(hidden[:, word])
        name = "embeddings" if layer == 0 else f"after layer {layer - 1}"
        log(f"  {name:14s} {c[0, 1]:.2f} / {c[0, 2]:.2f} / {c[0, 3:].max():.2f}")

    anchors = anchor_prompts(world, ["church"], PRESERVE_ANCHORS)
    with torch.no_grad():
        anchor_tokens = bundle.sample(anchors, guidance_weight=g, seeds=list(range(len(anchors))))
    n_layers = len(bundle.model.model.language_model.layers)
    names = [f"model.language_model.layers.{i}.{m}.weight" for i in range(n_layers)
             for m in ("self_attn.q_proj", "mlp.down_proj")]
    moments = input_second_moments(bundle.model, names,
                                   lambda: student_logits(bundle.model, bundle, anchors, anchor_tokens))
    prompts = [f"a photo of a {w} in a field" for w in WORDS[:3]]
    synonyms = bundle.encode_prompts(prompts)
    feats, hooks = {}, []
    for n in names:
        module = bundle.model.get_submodule(n.rsplit(".", 1)[0])
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=n: feats.__setitem__(n, a[0].detach())))
    try:
        with torch.no_grad():
            tokens = bundle.sample(prompts, guidance_weight=g, seeds=[1, 2, 3])
            bundle.teacher_forced(bundle.model, *synonyms, tokens)
    finally:
        for h in hooks:
            h.remove()
    prompt_len = synonyms[0].shape[1]
    log(f"  free parts ({100 * energy:g}% of the anchors' input energy preserved): share of church / chapel / "
        "cathedral outside the span; cosine of the free parts, church against chapel / cathedral")
    for n in names:
        projector, rank = null_space_projector(moments[n], energy)
        for where, cols in (("word", slice(word, word + 1)), ("image", slice(prompt_len, None))):
            x = feats[n][:, cols].reshape(3, -1, projector.shape[0])
            free = (x @ projector).reshape(3, -1)
            share = free.norm(dim=1) / x.reshape(3, -1).norm(dim=1)
            c = _cos(free)
            short = n.removeprefix("model.language_model.").removesuffix(".weight")
            log(f"  {short:28s} rank {rank:3d}/{projector.shape[0]} {where:5s}: "
                f"{share[0]:.2f} / {share[1]:.2f} / {share[2]:.2f}; {c[0, 1]:.2f} / {c[0, 2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-seeds", default="0,1", help="world builds (built and cached when missing)")
    ap.add_argument("--energy", type=float, default=0.9999, help="the preserved share of the anchors' input energy")
    args = ap.parse_args()
    for seed in (int(s) for s in args.world_seeds.split(",")):
        report(seed, args.energy)


if __name__ == "__main__":
    main()
