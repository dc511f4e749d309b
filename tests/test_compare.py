"""The held-out comparison's run of one method (benchmarks/bench_preservation.py) on a tiny world build."""

import json

import yaml

from ear_dist.config import WorldConfig
from ear_dist.world import World
from ear_dist.world.compare import Method, run_method
from ear_dist.world.erasure import WORLD_ERASE, make_pairs
from ear_dist.world.grammar import OBJECTS
from ear_dist.world.pretrain import build_world_model

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, batch_size=8,
             eval_prompts_per_word=3, calibration_samples=400, max_steps=2, eval_every=2)


def test_a_method_with_anchors_and_probes_trains_with_the_other_concepts_prompts(tmp_path):
    cfg = WorldConfig(cache_dir=str(tmp_path / "cache"), **SMALL)
    path, _ = build_world_model(cfg, progress=False, log=lambda _: None)
    world = World(cfg)
    pairs = {"church": make_pairs(world, "church", 4)}
    method = Method("anchored", ["preserve.weight=1.0"], anchors=6, probes=3)
    delta, step_s = run_method(method, str(path), world, pairs, ["church"], tmp_path / "run", 0,
                               [*WORLD_ERASE, "train.steps=2"])
    assert delta.endswith(".safetensors") and step_s > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    anchors, probes = saved["preserve"]["prompts"], saved["preserve"]["probe_prompts"]
    assert len(anchors) == 6 and len(probes) == 3 and set(anchors).isdisjoint(probes)
    church_words = [w for w in OBJECTS["church"]]
    assert not [p for p in anchors + probes if any(w in p.lower() for w in church_words)], json.dumps(anchors)
