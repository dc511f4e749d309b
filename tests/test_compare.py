"""The held-out comparison's run of one method (benchmarks/bench_preservation.py) on a tiny world build."""

import json

import pytest
import torch
import yaml

from ear_dist.config import WorldConfig
from ear_dist.world import World
from benchmarks.harness.compare import Method, hit_rates, run_method
from ear_dist.world.erasure import WORLD_ERASE, make_pairs
from ear_dist.world.grammar import OBJECTS, matching_templates
from ear_dist.world.pretrain import build_world_model

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, batch_size=8,
             eval_prompts_per_word=3, calibration_samples=400, max_steps=2, eval_every=2)


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_a_method_with_anchors_and_probes_trains_with_the_other_concepts_prompts(tmp_path):
    cfg = WorldConfig(cache_dir=str(tmp_path / "cache"), **SMALL)
    path, _ = build_world_model(cfg, progress=False, log=lambda _: None)
    world = World(cfg)
    pairs = {"church": make_pairs(world, "church", 4)}
    method = Method("anchored", ["preserve.weight=1.0"], anchors=6, probes=3)
    delta, step_s, _ = run_method(method, str(path), world, pairs, ["church"], tmp_path / "run", 0,
                               [*WORLD_ERASE, "train.steps=2"])
    assert delta.endswith(".safetensors") and step_s > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    anchors, probes = saved["preserve"]["prompts"], saved["preserve"]["probe_prompts"]
    assert len(anchors) == 6 and len(probes) == 3 and set(anchors).isdisjoint(probes)
    church_words = [w for w in OBJECTS["church"]]
    assert not [p for p in anchors + probes if any(w in p.lower() for w in church_words)], json.dumps(anchors)


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_composed_runs_with_surrogate_anchors_are_trained_as_array_tasks(tmp_path, monkeypatch):
    """A job array's task knows the array's concepts (slurm.concepts), so its surrogate anchors leave the other
    erased concepts out; the comparison's composed setting trains its per-concept runs the same way, apart from
    the concept-alone runs, which know no array."""
    from benchmarks.harness import compare as compare_module
    from benchmarks.harness.compare import compare

    # a 2-step model draws no church for the visual filter to keep: the pairs go in unfiltered
    asked = []

    def unfiltered(world, base, c, n, avoid=()):
        asked.append((c, tuple(avoid)))
        return make_pairs(world, c, n, avoid=avoid)

    monkeypatch.setattr(compare_module, "training_pairs", unfiltered)
    # a 2-step model misses its target: the comparison measures with it only when told to
    cfg = WorldConfig(cache_dir=str(tmp_path / "cache"), allow_missed_target=True, **SMALL)
    path, _ = build_world_model(cfg, progress=False, log=lambda _: None)
    method = Method("surrogates", ["preserve.nullspace=true", "preserve.surrogates=8"], anchors=4)
    res = compare(str(path), World(cfg), [method], tmp_path / "cmp", ["church"], ["church", "barn"], [0], "validation",
                  n_pairs=4, n_eval=2, base_overrides=[*WORLD_ERASE, "train.steps=1"], log=lambda _: None)
    assert [r["setting"] for r in res["runs"]] == ["church", "joint: church, barn", "composed: church, barn"]
    runs = tmp_path / "cmp" / "runs" / "surrogates" / "seed0"

    def saved(run):
        return yaml.safe_load((runs / run / "config.yaml").read_text())

    assert saved("church")["slurm"]["concepts"] == [] and saved("joint")["slurm"]["concepts"] == []
    for concept in ("church", "barn"):
        assert saved(f"array/{concept}")["slurm"]["concepts"] == ["church", "barn"]
    assert not (runs / "barn").exists()  # barn is erased only in the array
    # the concept alone gets the single-concept pairs; the joint run and the array tasks pairs that avoid the others
    assert asked == [("church", ()), ("barn", ()), ("church", ("church", "barn")), ("barn", ("church", "barn"))]


def test_the_synonym_validation_split_judges_chapel_on_training_templates_and_never_cathedral(tmp_path):
    """Settings are chosen on validation splits: the synonym one shows the first synonym on the training
    templates, so a choice can see erasure reach an untrained word while the second stays out of every choice."""
    world = World(WorldConfig(cache_dir=str(tmp_path / "cache"), **SMALL))
    seen: dict[str, list[str]] = {}

    class Recorder:  # the model's side of hit_rates: records what it is asked to draw
        def __init__(self, split):
            self.split = split

        def sample(self, prompts, guidance_weight, seeds, batch_size):
            seen.setdefault(self.split, []).extend(prompts)
            return torch.as_tensor(world.sample(len(prompts), "all", stream=9).tokens)

    for split in ("validation", "synonym-validation", "heldout"):
        hits = hit_rates(world, Recorder(split), split, 4, 5.0)
        assert {"church", "barn", "van gogh"} <= set(hits)
        assert ("church (chapel)" in hits) == (split != "validation")
        assert ("church (cathedral)" in hits) == (split == "heldout")
    for split in ("validation", "synonym-validation"):
        assert all(any(t.startswith("train/") for t in matching_templates(p)) for p in seen[split]), split
        assert not any("cathedral" in p for p in seen[split])
    assert any("chapel" in p for p in seen["synonym-validation"])
    assert not set(seen["synonym-validation"]) & set(seen["heldout"])


def test_another_draw_judges_the_same_prompts_with_other_sampling_seeds(tmp_path):
    """benchmarks/eval_noise.py judges the base against itself with hit_rates(draw=k): the prompts stay, the
    sampling seeds change, and draw 0 is what every comparison uses."""
    world = World(WorldConfig(cache_dir=str(tmp_path / "cache"), **SMALL))
    asked: dict[int, list] = {}

    class Recorder:
        def __init__(self, draw):
            self.draw = draw

        def sample(self, prompts, guidance_weight, seeds, batch_size):
            asked.setdefault(self.draw, []).append((list(prompts), list(seeds)))
            return torch.as_tensor(world.sample(len(prompts), "all", stream=9).tokens)

    for draw in (0, 1, 2):
        hit_rates(world, Recorder(draw), "heldout", 3, 5.0, draw=draw)
    first = asked[0][0]
    assert first[1] == [(42_000 + 0) * 1000 + i for i in range(3)]  # the first group's seeds, as before draws
    for draw in (1, 2):
        assert [p for p, _ in asked[draw]] == [p for p, _ in asked[0]]
        seeds = [s for _, ss in asked[draw] for s in ss]
        assert not set(seeds) & {s for k in asked if k != draw for _, ss in asked[k] for s in ss}


def test_bench_preservation_set_wins_over_a_methods_own_settings():
    """A sweep with --set must change what it names, even a setting the method itself fixes (the null-space
    energy of null-space EAR); before, the method's own value silently won."""
    from benchmarks.bench_preservation import build_methods
    from ear_dist.config import load_config
    from ear_dist.world.erasure import VAR_WORLD_ERASE, WORLD_ERASE

    for family, world_erase in (("janus", WORLD_ERASE), ("var", VAR_WORLD_ERASE)):
        (method,) = build_methods(["null-space EAR"], family, ["preserve.nullspace_energy=0.999", "optim.lr=6e-4"])
        anchors = ['preserve.prompts=["a barn"]']  # run_method adds the world's anchors the same way
        cfg = load_config(overrides=[*world_erase, *method.overrides, *anchors])
        assert cfg.preserve.nullspace_energy == 0.999 and cfg.optim.lr == 6e-4 and cfg.preserve.nullspace
        assert method.anchors == 64
        (plain,) = build_methods(["null-space EAR"], family)
        assert load_config(overrides=[*world_erase, *plain.overrides, *anchors]).preserve.nullspace_energy == 0.9999


def test_the_judges_noise_floor_is_the_base_against_its_own_other_draws(monkeypatch):
    """bench_preservation's noise floor: hit_rates at draws 1..k of the unchanged base, as preservation against
    draw 0 over every group (mean and the worst group per draw)."""
    import benchmarks.harness.compare as cmp

    base = {"a": 1.0, "b": 0.8, "c": 0.5, "z": 0.0}
    again = {1: {"a": 1.0, "b": 0.8, "c": 0.4, "z": 0.1}, 2: {"a": 0.9, "b": 0.8, "c": 0.5, "z": 0.0}}
    asked = []

    def fake_hit_rates(world, bundle, split, n, g, batch_size=64, draw=0):
        asked.append((split, n, g, draw))
        return again[draw]

    monkeypatch.setattr(cmp, "hit_rates", fake_hit_rates)
    rows = cmp.judge_noise(None, None, "validation", 48, 3.0, base, draws=2)
    assert asked == [("validation", 48, 3.0, 1), ("validation", 48, 3.0, 2)]
    assert [r["draw"] for r in rows] == [1, 2] and all(r["prompts_per_group"] == 48 for r in rows)
    assert rows[0]["mean"] == pytest.approx((1.0 + 1.0 + 0.8) / 3) and rows[0]["worst"] == pytest.approx(0.8)
    assert rows[0]["worst_group"] == "c"  # z: base hit rate 0, excluded
    assert rows[1]["mean"] == pytest.approx((0.9 + 1.0 + 1.0) / 3) and rows[1]["worst_group"] == "a"


def test_the_base_models_hit_rates_are_measured_once_per_model_split_and_size(tmp_path, monkeypatch):
    """bench_preservation measures the unchanged base once per model, split and size (minutes on the large
    world) and reads it back after; other weights, another size or a damaged file are measured again."""
    import benchmarks.harness.compare as cmp
    from safetensors.torch import save_file

    world = World(WorldConfig(cache_dir=str(tmp_path / "cache"), **SMALL))
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(3)}, str(model / "model.safetensors"))
    calls = []

    def fake_hit_rates(world, bundle, split, n, g, batch_size=64, draw=0):
        calls.append((split, n))
        return {"church": 0.5 + len(calls) / 100, "barn": 1.0}

    monkeypatch.setattr(cmp, "hit_rates", fake_hit_rates)
    said = []
    first = cmp.cached_base_hits(str(model), world, None, "validation", 8, 5.0, log=said.append)
    again = cmp.cached_base_hits(str(model), world, None, "validation", 8, 5.0, log=said.append)
    assert first == again == {"church": 0.51, "barn": 1.0} and calls == [("validation", 8)]
    assert "measured before" in said[-1] and str(model / ".base-hits") in said[-1]
    cmp.cached_base_hits(str(model), world, None, "validation", 16, 5.0, log=said.append)  # another size
    cmp.cached_base_hits(str(model), world, None, "heldout", 8, 5.0, log=said.append)  # another split
    assert calls == [("validation", 8), ("validation", 16), ("heldout", 8)]
    save_file({"w": torch.zeros(3)}, str(model / "model.safetensors"))  # other weights in the same folder
    assert cmp.cached_base_hits(str(model), world, None, "validation", 8, 5.0, log=said.append)["church"] == 0.54
    for f in (model / ".base-hits").glob("*.json"):
        f.write_text("{not json")
    assert cmp.cached_base_hits(str(model), world, None, "validation", 8, 5.0, log=said.append)["church"] == 0.55
    assert any("unreadable" in s for s in said)
    # a merge carries a base model's other files into the merged folder, but not this hidden one
    from ear_dist.models.merge import non_weight_files

    assert not [p for p in non_weight_files(model) if ".base-hits" in str(p)]


def test_the_comparison_runs_only_the_routes_it_is_asked_for(tmp_path, monkeypatch):
    """bench_preservation --routes joint trains one joint run and no per-concept run (and composed: the array
    alone); the figures of each route are those of the deltas it trained."""
    import benchmarks.harness.compare as cmp
    import ear_dist.models.delta as delta_module
    import ear_dist.models.family as family_module
    import ear_dist.world.pretrain as pretrain_module

    world = World(WorldConfig(cache_dir=str(tmp_path / "cache"), **SMALL))
    trained, judged = [], []

    def fake_run(method, model_path, world, pairs, concepts, out_dir, seed, base_overrides, steps_factor=1,
                 progress=False, extra=()):
        trained.append((tuple(concepts), out_dir.name))
        return f"{out_dir.name}.safetensors", 0.1, 2 * steps_factor

    monkeypatch.setattr(cmp, "run_method", fake_run)
    monkeypatch.setattr(cmp, "training_pairs", lambda world, base, c, n, avoid=(): [])
    monkeypatch.setattr(cmp, "hit_rates", lambda *a, **k: {"church": 1.0, "barn": 1.0, "castle": 1.0})
    monkeypatch.setattr(family_module, "load_model", lambda *a, **k: type("M", (), {"model": None})())
    monkeypatch.setattr(delta_module, "apply_deltas", lambda model, deltas: judged.append(list(deltas)))
    monkeypatch.setattr(pretrain_module, "model_build_info", lambda path: {})
    monkeypatch.setattr(pretrain_module, "refuse_missed_target", lambda *a, **k: None)
    method = cmp.Method("plain", [])
    for routes, runs, settings in (
            (["joint"], [(("church", "barn"), "joint")], ["joint: church, barn"]),
            (["composed"], [(("church",), "church"), (("barn",), "barn")], ["composed: church, barn"]),
            (["joint", "composed"], [(("church",), "church"), (("barn",), "barn"), (("church", "barn"), "joint")],
             ["joint: church, barn", "composed: church, barn"])):
        trained.clear(), judged.clear()
        res = cmp.compare(str(tmp_path), world, [method], tmp_path / "cmp", [], ["church", "barn"], [0], "validation",
                          n_pairs=2, n_eval=2, log=lambda _: None, base_hits={"church": 1.0, "barn": 1.0,
                                                                               "castle": 1.0}, routes=routes)
        assert trained == runs and [r["setting"] for r in res["runs"]] == settings
        expect = {"joint: church, barn": ["joint.safetensors"],
                  "composed: church, barn": ["church.safetensors", "barn.safetensors"]}
        assert judged == [expect[s] for s in settings]
    with pytest.raises(cmp.InputError, match="routes"):
        cmp.compare(str(tmp_path), world, [method], tmp_path / "cmp", [], ["church", "barn"], [0], "validation",
                    routes=["joint", "array"])
