"""The many-concept cost model (ear_dist/many/cost.py) against hand calculations on a tiny shape, and its
projector count against the projectors the training code builds."""

import math

import pytest
import torch

from ear_dist.many.cost import (GIB, MethodShape, ModelShape, anchor_cache_bytes, anchor_count, compose_cost,
                                compose_peak_bytes, decoder_linears, moment_bytes, peak_host_bytes, projection_flops,
                                projector_bytes, recipe_shape, route_cost, run_cost, setup_flops, step_flops,
                                train_state_bytes, trained_params)
from ear_dist.models.janus.presets import preset_config, tiny_config
from ear_dist.telemetry.flops import executed_train_flops_per_token, frozen_forward_flops_per_token, rollout_flops

# hidden 8, intermediate 12, 2 heads of 4, 3 layers; 2 x 2 = 4 image tokens over 16 codes
CONFIG = tiny_config(text_vocab_size=256, hidden_size=8, num_layers=3, num_heads=2, intermediate_size=12,
                     grid_side=2, codebook_size=16)
MODEL = ModelShape.of(CONFIG, image_tokens=4, prompt_len=3, dtype_bytes=4)


def method(**kw) -> MethodShape:
    base = dict(name="m", layers=(1, 2), modules="all", nullspace=True, kl_weight=3.0, pairs_per_step=2,
                steps_per_concept=50, window_len=2, per_step_anchors=4, refresh_every=10, branches=2,
                surrogates=64, norms_trained=False)
    return MethodShape(**{**base, **kw})


def test_shapes_and_bytes_by_hand():
    linears = decoder_linears(CONFIG, (1, 2))
    assert [(w.name, w.out, w.inp) for w in linears[:7]] == [
        ("q_proj", 8, 8), ("k_proj", 8, 8), ("v_proj", 8, 8), ("o_proj", 8, 8), ("gate_proj", 12, 8),
        ("up_proj", 12, 8), ("down_proj", 8, 12)]
    assert len(decoder_linears(CONFIG, (0, 1, 2), "attention")) == 12
    # float32: one projector per distinct input (q/k/v share, gate/up share): (64 + 64 + 64 + 144) x 4 per layer
    assert projector_bytes(linears, 4) == 2 * 336 * 4
    # bf16: those, and each linear's own bf16 copy (4 x 64 + 2 x 64 + 144) x 2 per layer
    assert projector_bytes(linears, 2) == 2 * 336 * 4 + 2 * 528 * 2
    assert moment_bytes(linears) == 2 * 528 * 8
    # 2 out in^2: 4 x (2 x 8 x 64) + 2 x (2 x 12 x 64) + 2 x 8 x 144 per layer
    assert projection_flops(linears) == 2 * (4096 + 3072 + 2304)
    assert trained_params(MODEL, method()) == 2 * 544
    # the paper's EAR on this model: first:5 -> all 3 layers, every module, the two RMSNorms too
    ear = recipe_shape("ear", 3)
    assert ear.layers == (0, 1, 2) and ear.norms_trained and not ear.uses_anchors
    assert trained_params(MODEL, ear) == 3 * 544 + 3 * 2 * 8
    assert anchor_cache_bytes(MODEL, 3, 2) == 3 * (2 * 4 * 16 * 4 + 4 * 8)
    assert train_state_bytes(10, 2) == 200 and train_state_bytes(10, 4) == 160


def test_step_flops_by_hand():
    f = MODEL.flops
    m = method()
    parts = step_flops(MODEL, m, anchors=3)
    ex = lambda s: executed_train_flops_per_token(f, s, 1088, 1)  # noqa: E731
    ff = lambda s: frozen_forward_flops_per_token(f, s)  # noqa: E731
    # 2 windows of 2 tokens: the student sees prefixes of 3 + 2 and 3 + 4 tokens; 2 pairs
    assert parts["teacher"] == 2 * 2 * 7 * ff(7)
    assert parts["student"] == 2 * 5 * ex(5) + 2 * 7 * ex(7)
    # every window update: 3 anchors (fewer than per_step 4), cond and uncond rows of 7 tokens
    assert parts["anchors' KL"] == 2 * 2 * 3 * 7 * ex(7)
    assert parts["drift refresh"] == pytest.approx(2 * 3 * 7 * ff(7) / 10)
    # 2 windows x 2 student calls (erasure, anchors) x (forward + backward), and the refresh's one batch / 10
    assert parts["null-space projection"] == pytest.approx(2 * 2 * 2 * 18944 + 18944 / 10)
    plain = step_flops(MODEL, method(nullspace=False, kl_weight=0.0), anchors=0)
    assert set(plain) == {"teacher", "student"}
    setup = setup_flops(MODEL, m, anchors=3)
    assert setup["anchor rollouts"] == rollout_flops(f, 3, 4, 3)
    assert setup["anchor distributions"] == setup["projector inputs"] == 2 * 3 * 7 * ff(7)
    assert setup["projector moments (fp64)"] == 2 * 3 * 7 * 2 * (2 * 528)
    # one eigh per distinct input of a layer: 9 (8^3 + 8^3 + 8^3 + 12^3), two layers
    assert setup["projector eigh (fp64)"] == 2 * 9 * (3 * 512 + 1728)
    run = run_cost(MODEL, m, 1, anchors_per_concept=0, pairs_per_concept=2, steps=1)
    assert run.fp64_flops == setup_flops(MODEL, m, 64)["projector moments (fp64)"] + 2 * 9 * (3 * 512 + 1728)
    assert setup_flops(MODEL, method(nullspace=False, kl_weight=0.0), anchors=3) == {}


def test_routes_add_up():
    m = method()
    assert anchor_count(m, 20, 16) == 20 * 16 + 64 and anchor_count(method(nullspace=False, kl_weight=0), 20, 16) == 0
    joint = route_cost(MODEL, m, 20, "joint", anchors_per_concept=16, pairs_per_concept=32)
    assert joint.steps == 1000
    assert joint.host_bytes["anchor cache"] == anchor_cache_bytes(MODEL, 384, 2)
    linears = decoder_linears(CONFIG, (1, 2))
    assert joint.setup_gpu_bytes == moment_bytes(linears) + projector_bytes(linears, 4)
    assert joint.gpu_bytes == {"trainable state": 16 * 1088, "projectors": projector_bytes(linears, 4)}
    task = run_cost(MODEL, m, 1, 16, 32)
    for how in ("sum", "project", "ties"):
        composed = route_cost(MODEL, m, 20, how, anchors_per_concept=16, pairs_per_concept=32, kept_prompts=64)
        flops, fp64, host = compose_cost(MODEL, m, 20, how, 32, 64)
        assert composed.steps == 20 * task.steps
        assert composed.total_flops == pytest.approx(20 * task.total_flops + sum(flops.values()))
        assert composed.fp64_flops == pytest.approx(20 * task.fp64_flops + fp64)
    params = trained_params(MODEL, m)
    # sum streams: a float64 sum, two deltas' float64 changes and one file's float32 tensors, whatever N
    assert compose_cost(MODEL, m, 20, "sum", 32, 64)[2] == {"reading and summing": (8 + 16 + 4) * params}
    assert compose_cost(MODEL, m, 1, "sum", 32, 64)[2] == {"reading and summing": (8 + 8 + 4) * params}
    ties = compose_cost(MODEL, m, 20, "ties", 32, 64)[2]
    assert ties["summing"] == 4 * params * 20 + 8 * params
    assert ties["reading"] == 4 * params * 20 + 8 * params + 4 * params
    assert compose_peak_bytes(ties) == max(ties.values())
    project = compose_cost(MODEL, m, 20, "project", 32, 64)
    # 21 prompt sets x one eigh per linear, and 20 unions x one per linear: 9 n^3 each
    linears = decoder_linears(CONFIG, (1, 2))
    # float64: the moments (2 in^2 per token of 2 rows of 7 tokens of 20 x 32 + 64 prompts), the eighs
    moments = 2 * (20 * 32 + 64) * 7 * sum(2 * w.inp ** 2 for w in linears)
    assert project[1] == moments + 41 * sum(9 * w.inp ** 3 for w in linears)
    assert project[2]["projecting"] == 4 * params * 20 + 2 * 21 * moment_bytes(linears)
    assert project[2]["at most: projecting, with the unions"] == project[2]["projecting"] + 20 * moment_bytes(linears)
    composed = route_cost(MODEL, m, 20, "project", anchors_per_concept=16, pairs_per_concept=32, kept_prompts=64)
    assert peak_host_bytes(composed) == project[2]["projecting"]
    assert peak_host_bytes(composed, bound=True) == project[2]["at most: projecting, with the unions"]


def test_recipes_and_7b_figures():
    many, preserving = recipe_shape("many", 30), recipe_shape("preserving", 30)
    assert many.pairs_per_step == 5 and preserving.pairs_per_step == 1
    assert many.layers == tuple(range(1, 30)) and many.nullspace and many.kl_weight == 3.0
    big = ModelShape.of(preset_config("janus-pro-7b"), 576, 20, dtype_bytes=2)
    # 29 layers of 4 x 4096^2 + 3 x 4096 x 11008 linear weights
    assert trained_params(big, many) == 29 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
    # projectors: per layer 3 float32 4096^2 + one 11008^2, and the bf16 copies of the 7 linears
    expected = 29 * (4 * (3 * 4096 ** 2 + 11008 ** 2) + 2 * (6 * 4096 ** 2 + 11008 ** 2))
    assert projector_bytes(decoder_linears(big.config, many.layers), 2) == expected
    assert math.isclose(expected / GIB, 30.5, abs_tol=0.1)


def test_projector_count_matches_the_training_code():
    """The projectors nullspace_projectors builds take the bytes the formula counts (q/k/v and gate/up share)."""
    from ear_dist.config import TrainableConfig
    from ear_dist.models.janus import build_preset
    from ear_dist.train.adapters import linear_weights, nullspace_projectors
    from ear_dist.train.trainable import select_trainable_names

    bundle = build_preset("tiny", config=CONFIG)
    model = bundle.model
    names = linear_weights(model, select_trainable_names(model, TrainableConfig(layers="all-but-first", modules="all")))
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    projectors, _ = nullspace_projectors(model, names, lambda: model.model.language_model(input_ids=ids), 0.99)
    held = {t.data_ptr(): t.numel() * t.element_size() for t in projectors.values()}
    assert len(projectors) == 14 and len(held) == 8
    assert sum(held.values()) == projector_bytes(decoder_linears(CONFIG, (1, 2)), 4)
