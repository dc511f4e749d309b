"""Named method recipes (``--recipe``), layer choices relative to the model (``trainable.layers``) and a
preset's implied family: what a user selecting a method by name would notice if it broke."""

import json

import pytest
import yaml

from ear_dist.cli import main
from ear_dist.config import Config, ConfigError, from_dict, load_config, read_recipe, recipe_files, recipe_overrides
from ear_dist.config.layers import resolve_layers
from ear_dist.config.loading import example_description
from ear_dist.models.janus import build_preset
from ear_dist.models.janus.presets import tiny_config
from ear_dist.train.trainable import select_trainable_names

WORLD, JANUS_1B, JANUS_7B = 4, 24, 30
ANCHORS = 'preserve.prompts=["a photo of a barn"]'  # the preserving recipes need anchor prompts to validate


@pytest.mark.parametrize("spec, world, one_b, seven_b", [
    ("all", range(0, 4), range(0, 24), range(0, 30)),
    ("all-but-first", range(1, 4), range(1, 24), range(1, 30)),
    ("all-but-first:2", range(2, 4), range(2, 24), range(2, 30)),
    ("first:5", range(0, 4), range(0, 5), range(0, 5)),  # at most every layer
    ("first:2", range(0, 2), range(0, 2), range(0, 2)),
    ("share:0.25", range(0, 1), range(0, 6), range(0, 8)),  # round(7.5) = 8, half up
    ("share:0.5", range(0, 2), range(0, 12), range(0, 15)),
    ("share:0.01", range(0, 1), range(0, 1), range(0, 1)),  # at least one layer
    ("share:1", range(0, 4), range(0, 24), range(0, 30)),
])
def test_a_layer_spec_resolves_against_the_models_layer_count(spec, world, one_b, seven_b):
    assert [resolve_layers(spec, n) for n in (WORLD, JANUS_1B, JANUS_7B)] == [world, one_b, seven_b]


def test_skip_first_layers_applies_to_any_spec_and_an_empty_spec_is_first_k_layers():
    assert resolve_layers("", 30, first_k_layers=5, skip_first_layers=1) == range(1, 5)
    assert resolve_layers("all", 24, skip_first_layers=2) == range(2, 24)
    assert resolve_layers("all-but-first", 4, skip_first_layers=2) == range(2, 4)
    assert resolve_layers("first:2", 4, skip_first_layers=3) == range(2, 2)  # empty: the selection says so


@pytest.mark.parametrize("spec", ["some", "first:0", "share:0", "share:1.5", "share:x", "first:-1", "all-but"])
def test_a_bad_layer_spec_is_a_config_error_naming_the_key(spec):
    with pytest.raises(ConfigError, match=r"^trainable\.layers: .* is not a layer spec"):
        load_config(overrides=[f"trainable.layers={spec}"])


def test_every_recipe_loads_describes_itself_and_matches_its_override_form():
    names = list(recipe_files())
    assert {"ear", "svare", "esd", "preserving", "world-ear", "world-preserving", "world-var-ear",
            "world-var-svare", "world-var-preserving"} <= set(names)
    for name, path in recipe_files().items():
        assert example_description(path), f"{path}: the first comment line describes the recipe"
        cfg = load_config(recipes=[name], overrides=[ANCHORS])
        assert load_config(overrides=[*recipe_overrides(name), ANCHORS]) == cfg, name


def test_the_recipes_hold_the_methods_settings():
    ear = load_config(recipes=["ear"])
    assert (ear.erase.method, ear.erase.target_mode, ear.erase.loss_threshold, ear.erase.window_len) == \
        ("ear", "hidden", 0.05, 48)
    assert (ear.trainable.layers, ear.trainable.modules, ear.optim.lr, ear.train.steps) == ("first:5", "all", 1e-4, 50)
    assert load_config(recipes=["svare"]).erase.method == "svare"
    assert load_config(recipes=["esd"]).erase.method == "esd"
    p = load_config(recipes=["preserving"], overrides=[ANCHORS])
    assert (p.erase.loss_threshold, p.trainable.layers, p.trainable.modules, p.optim.lr) == \
        (0.0, "all-but-first", "all", 1.5e-3)
    assert (p.preserve.nullspace, p.preserve.nullspace_energy, p.preserve.weight, p.preserve.surrogates) == \
        (True, 0.999, 3.0, 64)
    world = load_config(recipes=["world-preserving"], overrides=[ANCHORS])
    assert (world.erase.window_len, world.train.steps, world.trainable.layers) == (16, 50, "all-but-first")
    var = load_config(recipes=["world-var-svare"])
    assert (var.model.family, var.erase.method, var.erase.svare_bit_error_share) == ("var", "svare", 0.08)
    assert var.trainable.patterns == ["block_chunks.*.ca.*", "block_chunks.*.ffn.*"]


def test_precedence_is_defaults_then_recipes_then_config_files_then_set(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 0.002\ntrain:\n  steps: 7\n")
    assert load_config(recipes=["world-ear"]).optim.lr == 3e-4  # the recipe over the default 1e-4
    cfg = load_config(recipes=["world-ear"], files=[str(f)], overrides=["train.steps=9"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.erase.window_len) == (0.002, 9, 16)
    # recipes in order, later wins
    later = load_config(recipes=["world-ear", "preserving"], overrides=[ANCHORS])
    assert (later.optim.lr, later.erase.loss_threshold, later.erase.window_len) == (1.5e-3, 0.0, 16)
    # the command line: the same order
    args = ["config", "show", "--recipe", "world-ear", "--config", str(f), "--set", "train.steps=9"]
    assert main(args) == 0


def test_a_later_first_k_layers_clears_a_recipes_layers_and_skip_first_layers_stacks(tmp_path):
    cfg = load_config(recipes=["world-ear"], overrides=["trainable.first_k_layers=3"])
    assert (cfg.trainable.layers, cfg.trainable.first_k_layers) == ("", 3)
    f = tmp_path / "legacy.yaml"
    f.write_text("trainable:\n  first_k_layers: 4\n")
    assert load_config(recipes=["preserving"], files=[str(f)], overrides=[ANCHORS]).trainable.layers == ""
    kept = load_config(recipes=["world-ear"], overrides=["trainable.skip_first_layers=1"])
    assert (kept.trainable.layers, resolve_layers(kept.trainable.layers, 4, 5, 1)) == ("first:2", range(1, 2))


def _tiny(layers):
    return build_preset("tiny", seed=0, config=tiny_config(num_layers=layers)).model


def _layers_of(names):
    return sorted({int(n.split(".")[3]) for n in names})


def test_a_recipe_on_a_tiny_model_selects_the_expected_parameters():
    model = _tiny(6)
    preserving = select_trainable_names(model, load_config(recipes=["preserving"], overrides=[ANCHORS]).trainable)
    assert _layers_of(preserving) == [1, 2, 3, 4, 5]
    assert any(n.endswith("mlp.down_proj.weight") for n in preserving)  # every module, not only attention
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in preserving
    ear = select_trainable_names(model, load_config(recipes=["ear"]).trainable)
    assert _layers_of(ear) == [0, 1, 2, 3, 4]
    world = select_trainable_names(model, load_config(recipes=["world-ear"]).trainable)
    assert _layers_of(world) == [0, 1] and all(".self_attn." in n for n in world)
    svare = select_trainable_names(model, load_config(recipes=["svare"]).trainable)  # the default layers
    assert svare == select_trainable_names(model, Config().trainable)


def test_on_the_worlds_four_layers_the_preserving_recipe_selects_what_the_fixed_layer_counts_did():
    """The world's preserving method was first_k_layers=4 with skip_first_layers=1: the same tensors, in order."""
    model = _tiny(4)
    recipe = load_config(recipes=["world-preserving"], overrides=[ANCHORS]).trainable
    fixed = load_config(overrides=["trainable.first_k_layers=4", "trainable.skip_first_layers=1",
                                   "trainable.modules=all"]).trainable
    assert select_trainable_names(model, recipe) == select_trainable_names(model, fixed)
    world_ear = load_config(recipes=["world-ear"]).trainable
    assert select_trainable_names(model, world_ear) == select_trainable_names(
        model, load_config(overrides=["trainable.first_k_layers=2"]).trainable)


@pytest.mark.parametrize("preset, line", [
    ("janus-pro-7b", "(janus, 30 layers): all modules of layers 1-29 of 30 (all-but-first)"),
    ("janus-pro-1b", "(janus, 24 layers): all modules of layers 1-23 of 24 (all-but-first)"),
    ("tiny-var", "(var, 4 layers): all modules of layers 1-3 of 4 (all-but-first)"),
])
def test_config_show_prints_the_layers_a_recipe_resolves_to_on_the_model(preset, line, capsys):
    assert main(["config", "show", "--recipe", "preserving", "--set", f"model.path={preset}", "--set", ANCHORS]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"# trained on {preset} {line}"
    shown = from_dict(Config, yaml.safe_load(out))
    assert shown == load_config(recipes=["preserving"], overrides=[f"model.path={preset}", ANCHORS])


def test_config_show_reads_the_layer_count_of_a_local_model_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 12}}))
    assert main(["config", "show", "--recipe", "ear", "--set", f"model.path={tmp_path}"]) == 0
    assert capsys.readouterr().out.strip().endswith("all modules of layers 0-4 of 12 (first:5)")


def test_config_list_names_every_recipe_with_its_description(capsys):
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    for name, path in recipe_files().items():
        assert f"  {name}" in out and example_description(path) in out


def test_an_unknown_recipe_is_one_line_naming_the_recipes(capsys):
    assert main(["config", "show", "--recipe", "preservng"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ear-dist: config error: --recipe preservng: no such recipe") and "preserving" in err
    assert len(err.splitlines()) == 1


def test_a_recipe_that_extends_itself_is_an_error(tmp_path, monkeypatch):
    from ear_dist.config import loading

    (tmp_path / "a.yaml").write_text("# a\nextends: b\n")
    (tmp_path / "b.yaml").write_text("# b\nextends: [a]\n")
    monkeypatch.setattr(loading, "RECIPES_DIR", tmp_path)
    with pytest.raises(ConfigError, match="extends itself through a -> b -> a"):
        read_recipe("a")


def test_a_recipe_with_an_unknown_key_names_its_file(tmp_path, monkeypatch):
    from ear_dist.config import loading

    (tmp_path / "bad.yaml").write_text("# bad\ntrainable:\n  layer: all\n")
    monkeypatch.setattr(loading, "RECIPES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"bad\.yaml: trainable\.layer: unknown key"):
        load_config(recipes=["bad"])


def test_a_preset_implies_its_family_unless_the_family_is_set():
    assert load_config(overrides=["model.path=tiny-var"]).model.family == "var"
    assert load_config(overrides=["model.path=infinity-2b"]).model.family == "var"
    assert load_config(overrides=["model.path=janus-pro-7b"]).model.family == "janus"
    assert load_config(overrides=["model.path=tiny-var", "model.family=janus"]).model.family == "janus"
    assert load_config(recipes=["world-var-ear"], overrides=["model.path=tiny"]).model.family == "var"


def test_generate_with_a_var_preset_needs_no_family(tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", "tiny-var", "--prompt", "a church", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file()
    explicit = main(["generate", "--model", "tiny-var", "--set", "model.family=janus", "--prompt", "a church",
                     "--out", str(tmp_path / "bad")])
    assert explicit == 2  # a family set on purpose is not overridden: the mismatch is named


def test_the_demo_applies_a_recipe_to_every_run_over_the_worlds_settings_and_under_set(monkeypatch, tmp_path):
    from ear_dist.world import erasure, pretrain, var_world

    seen = {}
    monkeypatch.setattr(pretrain, "build_world_model", lambda *a, **k: (tmp_path, {}))
    monkeypatch.setattr(var_world, "world_for", lambda *a: None)
    monkeypatch.setattr(erasure, "run_world_erasure", lambda path, world, out, **kw: seen.update(kw) or {})
    monkeypatch.setattr(erasure, "markdown_table", lambda rows: "")
    monkeypatch.setattr(erasure, "bar_report", lambda rows: "")
    assert main(["demo", "--recipe", "esd", "--set", "train.steps=3", "--out", str(tmp_path)]) == 0
    assert seen["overrides"] == [*erasure.WORLD_ERASE, *recipe_overrides("esd"), "train.steps=3"]
    assert erasure.ABLATIONS["preserving"] == recipe_overrides("preserving")
    assert erasure.VAR_ABLATIONS["preserving"] == recipe_overrides("preserving-var")


def test_a_run_without_a_layer_spec_keeps_the_identity_it_had_before_the_key_existed():
    """A run directory written before trainable.layers existed still resumes (train.resume=auto)."""
    from ear_dist.train.run_state import run_identity

    plain = run_identity(load_config(), "fp", "data", None, 1)
    assert "trainable.layers" not in plain.keys and plain.keys["trainable.first_k_layers"] == 5
    spec = run_identity(load_config(recipes=["world-ear"]), "fp", "data", None, 1)
    assert spec.keys["trainable.layers"] == "first:2" and spec.hash != plain.hash


def test_the_configs_preset_families_are_the_models_presets():
    from ear_dist.config.schema import PRESET_FAMILIES
    from ear_dist.models.janus.presets import PRESETS
    from ear_dist.models.var.presets import VAR_PRESETS

    assert PRESET_FAMILIES == {**{p: "janus" for p in PRESETS}, **{p: "var" for p in VAR_PRESETS}}


def test_the_model_card_names_a_deltas_layer_spec():
    from ear_dist.models.merge import _method_section

    card = _method_section([{"config": load_config(recipes=["preserving"]).to_dict()},
                            {"config": load_config(overrides=["trainable.skip_first_layers=1"]).to_dict()}])
    assert "| all of layers all-but-first |" in card
    assert "| attention of the first 5 layers less the first 1 |" in card
