"""Activation memory of a white-box attack's gradient pass at the Janus-Pro-7B width, projected to its 30 layers.

The attacks' teacher-forced pass (``image_loss`` with the learned words fed through ``new_words``, the model frozen)
keeps for the backward what autograd saves. This counts those tensors (each storage once, the model's own
parameters left out) for a random bf16 model of the 7B width with 1 and 2 language-model layers and 1 and 2
sequences, on the CPU: the difference is the cost of one layer for one sequence and of the rest (embeddings, head
logits, loss) for one sequence. No GPU needed; a GPU's attention kernels save no more than the CPU's SDPA.

    OMP_NUM_THREADS=1 python benchmarks/attack_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS_7B = 30
MODEL_GIB_7B = 6.99e9 * 2 / 2**30  # bf16 weights


def saved_bytes(layers: int, rows: int) -> int:
    """Bytes autograd saves for one attack gradient pass over ``rows`` sequences (576 image tokens each)."""
    import torch

    from ear_dist.eval.attacks.common import frozen, image_loss, new_words
    from ear_dist.models.family import as_image_model
    from ear_dist.models.janus.bundle import build_preset
    from ear_dist.models.janus.presets import janus_pro_config

    cfg = janus_pro_config("7b")
    cfg.text_config.num_hidden_layers = layers
    cfg.vision_config.num_hidden_layers = 1  # the understanding tower is not on the attack's path
    model = as_image_model(build_preset("7b-width", config=cfg, dtype=torch.bfloat16))
    params = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    tokens = torch.randint(model.codebook_size, (rows, model.num_image_tokens), generator=torch.Generator().manual_seed(0))
    vectors = torch.zeros(2, model.hidden_size, requires_grad=True)
    with frozen(model.model), new_words(model, ["<inv0>", "<inv1>"], lambda: vectors):
        ids, mask = model.encode_prompts(["a photo of a <inv0> <inv1>"] * rows)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = image_loss(model, ids, mask, tokens).mean()
        torch.autograd.grad(loss, [vectors])
    return sum(storages.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="", help="write the figures here too")
    args = p.parse_args(argv)
    import torch

    from ear_dist.config import load_config

    torch.set_num_threads(1)
    one, two_layers, two_rows = saved_bytes(1, 1), saved_bytes(2, 1), saved_bytes(1, 2)
    gib = 2 ** 30
    per_layer = (two_layers - one) / gib
    rest = (two_rows - one) / gib - per_layer  # per sequence, outside the layers
    per_sequence = LAYERS_7B * per_layer + rest
    a = load_config().eval.attack
    out = {"per_layer_per_sequence_gib": per_layer, "outside_layers_per_sequence_gib": rest,
           "per_sequence_7b_gib": per_sequence, "model_7b_gib": MODEL_GIB_7B,
           "inversion_batch": a.inversion_batch, "inversion_gib": a.inversion_batch * per_sequence,
           "search_batch": a.search_batch, "search_gib": a.search_batch * per_sequence}
    print(f"per layer and sequence: {per_layer:.4f} GiB; outside the layers, per sequence: {rest:.4f} GiB")
    print(f"Janus-Pro-7B ({LAYERS_7B} layers): {per_sequence:.2f} GiB per sequence; the inversion's "
          f"{a.inversion_batch} targets per step {out['inversion_gib']:.1f} GiB, the search's {a.search_batch} "
          f"{out['search_gib']:.1f} GiB, beside the model's {MODEL_GIB_7B:.1f} GiB of bf16 weights")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
