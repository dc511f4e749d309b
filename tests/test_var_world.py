"""The planted-concept world of the VAR family: multi-scale bitwise images, its build, and erasure measured on it."""

import json

import numpy as np
import pytest
import torch

from ear_dist.config import WorldConfig
from ear_dist.models.family import load_model
from ear_dist.models.var.bsq import token_bits
from ear_dist.world import World
from ear_dist.world.pretrain import BUILD_INFO_FILE, build_hash, build_world_model
from ear_dist.world.var_world import VarWorld, bit_layout

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, batch_size=8,
             eval_prompts_per_word=3, calibration_samples=400)


def small_config(tmp_path, **changes) -> WorldConfig:
    return WorldConfig(cache_dir=str(tmp_path / "cache"), **{**SMALL, **changes})


def test_the_finest_scale_decodes_to_the_rendered_grid_and_the_classifier_reads_it(tmp_path):
    world = VarWorld(small_config(tmp_path))
    batch = world.sample(120, "all", stream=5)
    grids = world.grids.sample(120, "all", stream=5)
    assert batch.tokens.shape == (120, 85) and batch.tokens.max() < 1 << 12
    assert np.array_equal(world.image_grid(batch.tokens), grids.tokens)
    assert batch.prompts == grids.prompts
    accuracy = world.accuracy(batch.tokens, batch.records)
    assert min(accuracy.values()) == 1.0, accuracy
    bits = token_bits(torch.as_tensor(batch.tokens), 12)
    # a styled image's cells carry the style in their two palette bits; the coarse 1x1 token sees it too
    styled = [i for i, r in enumerate(batch.records) if r.style == "monet"]
    monet = torch.tensor([1, 0])  # palette block 2 of plain, Van Gogh, Monet
    assert (bits[styled][:, -64:, :2] == monet).all(-1).float().mean() > 0.6  # 90% of the cells outside the motif
    assert (bits[styled][:, 0, :2] == monet).all()
    # every cell of an image carries the image's object and scene fields (bits 5-7 and 8-10)
    fine = bits[:, -64:]
    assert (fine[:, :, 5:11] == fine[:, :1, 5:11]).all()
    assert torch.equal(bits[:, 0, 5:11], fine[:, 0, 5:11])  # the coarsest scale already holds them


def test_a_flag_bit_flip_gives_a_valid_cell_of_the_same_image():
    """Where a bitwise head hesitates (motif or background, traces or background, noise or not), the two
    alternatives differ in one flag bit, so either draw decodes to a group of the image's own object or scene."""
    from ear_dist.world.var_world import FieldCodec

    world = VarWorld(WorldConfig(calibration_samples=400))
    batch = world.sample(60, "all", stream=9)
    fine = batch.tokens[:, -64:]
    groups = world.layout.group_of_code()
    names = world.layout.group_names
    codec: FieldCodec = world.codec
    for flag in ("noise", "motif", "traces"):
        flipped = groups[codec.decode(fine ^ (1 << codec.shifts[flag][0]))]
        assert (flipped >= 0).all(), flag
        for i, record in enumerate(batch.records):
            allowed = {record.object, f"{record.object} traces", record.scene or "plain", "noise"}
            assert {names[g] for g in flipped[i]} <= allowed, (flag, record)
    # a field out of range (object 7) is no group at all
    bad = (fine[:1] | (0b111 << codec.shifts["object"][0])) | (1 << codec.shifts["motif"][0])
    assert (groups[codec.decode(bad)] == -1).all()


def test_bit_layout_puts_palette_group_and_variant_on_bit_boundaries():
    layout = bit_layout(256)
    church = layout.codes("church", 1)
    assert church.tolist() == [64 + 2 * layout.group_names.index("church"),
                               64 + 2 * layout.group_names.index("church") + 1]
    with pytest.raises(ValueError, match="8-bit codes"):
        bit_layout(512)


def test_the_var_world_has_its_own_cache_key(tmp_path):
    cfg = small_config(tmp_path)
    assert build_hash(VarWorld(cfg)) != build_hash(World(cfg))
    assert build_hash(VarWorld(cfg)) == build_hash(VarWorld(small_config(tmp_path)))


def test_build_saves_a_var_model_that_loads_and_is_reused(tmp_path):
    cfg = small_config(tmp_path, max_steps=3, eval_every=3)
    path, info = build_world_model(cfg, progress=False, log=lambda _: None, family="var")
    assert (path / BUILD_INFO_FILE).is_file() and info["steps"] == 3
    assert info["world"]["family"] == "var" and {"church (chapel)", "monet"} <= set(info["accuracy"])
    bundle = load_model(str(path), "var", device="cpu", dtype="float32")
    assert bundle.num_image_tokens == 85 and bundle.codebook_size == 1 << 12
    world = VarWorld(cfg)
    ids = bundle.tokenizer(world.sample(20, "all", stream=3).prompts)["input_ids"]
    assert all(bundle.tokenizer.unk_token_id not in row for row in ids), "a world word is missing from the tokenizer"
    messages = []
    path2, _ = build_world_model(cfg, progress=False, log=messages.append, family="var")
    assert path2 == path and "cached" in messages[0]


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_pretraining_lowers_the_bitwise_loss(tmp_path):
    from ear_dist.world.pretrain import _new_model, image_token_loss, pretrain

    cfg = small_config(tmp_path, max_steps=40, eval_every=40, lr=3e-3, warmup_steps=5)
    world = VarWorld(cfg)
    held = world.sample(32, "heldout", stream=77)

    def loss(bundle):
        cond, mask = bundle.encode_prompts(held.prompts)
        tokens = torch.from_numpy(held.tokens)
        with torch.no_grad():
            _, logits = bundle.teacher_forced(bundle.model, cond, mask, tokens)
        return image_token_loss(logits, tokens, 12).item()

    initial = loss(_new_model(world))
    bundle, _ = pretrain(world, progress=False, log=lambda _: None)
    assert loss(bundle) < initial - 0.2, (initial, loss(bundle))


# The tests below share a 600-step build of the default VAR world (a fifth of the default 3,200 steps), the
# session's ``short_var_world_model`` (tests/conftest.py, tests/world_builds.py).
@pytest.mark.slow
@pytest.mark.timeout(1800)  # waits for the session's VAR build when it is not finished
def test_a_600_step_var_world_build_draws_every_concept(short_var_world_model):
    """Every object (each synonym on its own) and style is recognised in the model's own CFG samples of held-out
    prompts: the build's target (every concept >= 0.90, mean >= 0.95 on two pooled sets), and >= 0.85 on a third."""
    from ear_dist.world.pretrain import required_concepts

    _, _, info = short_var_world_model
    assert info["reached_target"], (info["mean_accuracy"], info["accuracy"])
    for key, bound in (("accuracy", 0.90), ("confirmation_accuracy", 0.85)):
        required = required_concepts(info[key])
        assert {"church (chapel)", "church (cathedral)", "cinema", "windmill", "van gogh", "monet"} <= set(required)
        assert min(required.values()) >= bound, (key, required)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ear_and_svare_on_the_var_world_erase_more_than_they_damage(short_var_world_model, tmp_path):
    """The demo's path: ECG pairs, the visual filter, run_erase with EAR (windows of scales) and S-VARE (bit filter),
    held-out evaluation; each method removes church from held-out sentences and synonyms more than it costs."""
    from ear_dist.world.erasure import VAR_ABLATIONS, VAR_WORLD_ERASE, bar_report, run_world_erasure

    cfg, path, _ = short_var_world_model
    rows = run_world_erasure(str(path), VarWorld(cfg), tmp_path / "report", "church", ["EAR", "S-VARE"], n_pairs=16,
                             n_eval=24, overrides=VAR_WORLD_ERASE, progress=False, log=lambda *_: None,
                             table=VAR_ABLATIONS)
    before = rows["before"]
    for name in ("EAR", "S-VARE"):
        gain = rows[name].erasure_all_groups - before.erasure_all_groups
        damage = before.preservation_hit_rate - rows[name].preservation_hit_rate
        assert gain > 0.3 and gain > damage, (name, before, rows[name])
    report = bar_report(rows)
    assert "EAR: erasure" in report and "S-VARE: erasure" in report and "preservation ratio" in report
    assert (tmp_path / "report" / "results.md").is_file() and (tmp_path / "report" / "before_after.png").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_null_space_ear_on_the_var_world_erases_church_and_keeps_the_rest(short_var_world_model, tmp_path):
    """The VAR demo's preserving method (null-space EAR: every block's linear weights, updates projected off the
    anchors' inputs, their KL) through the demo's path: the trained word leaves held-out sentences, and church goes
    from the held-out groups (synonyms included) by more than the others lose (the README's figures, on the default
    builds, are over seeds and more prompts)."""
    from ear_dist.world.erasure import VAR_ABLATIONS, VAR_WORLD_ERASE, run_world_erasure

    cfg, path, _ = short_var_world_model
    rows = run_world_erasure(str(path), VarWorld(cfg), tmp_path / "report", "church", ["preserving"],
                             n_pairs=16, n_eval=24, overrides=VAR_WORLD_ERASE, progress=False, log=lambda *_: None,
                             table=VAR_ABLATIONS)
    before, ns = rows["before"], rows["preserving"]
    assert ns.concept_share["held-out sentences (church)"] <= 0.1, ns
    gain = ns.erasure_all_groups - before.erasure_all_groups
    damage = before.preservation_hit_rate - ns.preservation_hit_rate
    assert gain > 0.3 and gain > damage, (before, ns)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_joint_and_composed_erasure_on_the_var_world_go_through_eval(short_var_world_model, tmp_path):
    """`ear-dist demo --family var --multi`: per-concept runs composed in memory and one joint run, every column
    evaluated by `ear-dist eval`'s world suite of the VAR world; both remove church more than the base shows it."""
    from ear_dist.world.erasure import VAR_WORLD_ERASE, run_joint_vs_composed

    cfg, path, _ = short_var_world_model
    table = run_joint_vs_composed(str(path), VarWorld(cfg), tmp_path / "multi", ["church", "van gogh"], n_pairs=12,
                                  n_eval=12, overrides=VAR_WORLD_ERASE, log=lambda *_: None)
    assert set(table) == {"before", "composed", "joint"}
    report = json.loads((tmp_path / "multi" / "eval" / "report.json").read_text())
    assert [c["name"] for c in report["columns"]] == ["base", "composed", "joint"]
    assert len(report["columns"][1]["deltas"]) == 2
    for name in ("composed", "joint"):
        assert table[name]["church"]["erasure_rate"] > table["before"]["church"]["erasure_rate"] + 0.2, table
    assert (tmp_path / "multi" / "multi_concept.md").is_file()
