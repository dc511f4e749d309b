"""The VAR family through the same distributed engine, teacher placements, shards, deltas, merge and Slurm.

One config key (``model.family=var``) selects the family; everything else is the Janus
code path. What a user would notice if these broke: 2 ranks training another student
than 1 process, a teacher placement changing what is trained, a merged model that does
not load or does not hold the deltas, shards that do not train, an array job without
its deltas.
"""

import json

import pytest
import torch

from ear_dist.cli import main
from ear_dist.config import load_config
from ear_dist.models.var.bundle import load_var, save_tiny_var_checkpoint
from ear_dist.train.trainer import run_erase
from tests.test_distributed import TOLERANCE, _max_diff, _torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PAIRS = [
    {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
    {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"},
    {"original_prompt": "a red church in snow", "modified_prompt": "a red windmill in snow", "concept": "church"},
]
# a cold, strongly guided sampler makes the tiny random model's rollouts depend on the prompt
SAMPLING = ["rollout.guidance_weight=50", "rollout.temperature=0.2"]


def _overrides(model, pairs, out, *extra):
    return [f"model.path={model}", "model.family=var", f"data.pairs={pairs}", f"train.out_dir={out}",
            "train.steps=3", "train.pairs_per_step=2", "optim.lr=1e-2", "erase.loss_threshold=0",
            "trainable.first_k_layers=2", "train.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("var-dist")
    model = save_tiny_var_checkpoint(d / "model", seed=0)
    pairs = d / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    return d, model, pairs


@pytest.mark.parametrize("stage, extra", [
    ("2", ["erase.update_mode=sequence"]),
    ("2", ["erase.update_mode=window"]),  # the first window is the 1x1 scale: one key per query
    ("3", ["erase.update_mode=sequence"]),
    ("2", ["erase.method=svare", "trainable.modules=all"]),
])
def test_two_ranks_under_zero_give_the_one_process_delta(world, stage, extra):
    d, model, pairs = world
    name = f"z{stage}-" + "-".join(e.split("=")[1] for e in extra)
    one = run_erase(load_config(overrides=_overrides(model, pairs, d / f"{name}-one", *extra)), progress=False)
    _torchrun(2, _overrides(model, pairs, d / f"{name}-two", *extra, f"dist.deepspeed_config=ds_configs/zero{stage}.json"))
    assert _max_diff(one["delta"], d / f"{name}-two" / "delta.safetensors") < TOLERANCE
    assert json.loads((d / f"{name}-two" / "summary.json").read_text())["student_ranks"] == 2
    assert one["optimizer_steps"] >= 3


@pytest.mark.parametrize("extra", [[], ["erase.target_mode=logit", "erase.teacher_guidance_weight=3"]])
def test_the_three_teacher_placements_give_the_same_delta(world, extra):
    d, model, pairs = world
    extra = ["erase.update_mode=sequence", *SAMPLING, *extra]
    here = d / ("placements-" + str(len(extra)))
    colocated = run_erase(load_config(overrides=_overrides(model, pairs, here / "colocated", *extra)),
                          progress=False)["delta"]
    sets = [x for o in _overrides(model, pairs, here / "unused", *extra) for x in ("--set", o)]
    assert main(["teacher", "precompute", "--out", str(here / "teacher"), *sets]) == 0
    run_erase(load_config(overrides=_overrides(model, pairs, here / "offline", *extra, "dist.teacher_placement=offline",
                                               f"dist.teacher_dir={here / 'teacher'}")), progress=False)
    assert _max_diff(colocated, here / "offline" / "delta.safetensors") == 0.0
    _torchrun(2, _overrides(model, pairs, here / "dedicated", *extra, "dist.teacher_placement=dedicated"))
    assert _max_diff(colocated, here / "dedicated" / "delta.safetensors") < TOLERANCE


def test_merge_then_load_then_generate(world, tmp_path, capsys):
    """Two deltas merged onto the base load back through the family's loader, hold base + both changes, and sample."""
    from ear_dist.models.delta import load_delta

    d, model, pairs = world
    deltas = []
    for i, lr in enumerate(("1e-2", "5e-3")):
        cfg = load_config(overrides=_overrides(model, pairs, tmp_path / f"run{i}", f"optim.lr={lr}",
                                               "erase.update_mode=sequence"))
        deltas.append(run_erase(cfg, progress=False)["delta"])
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(model), "--delta", deltas[0], "--delta", deltas[1], "--out", str(merged)]) == 0
    base = dict(load_var(str(model), device="cpu", dtype="float32").model.state_dict())
    got = load_var(str(merged), device="cpu", dtype="float32")
    state = got.model.state_dict()
    first, meta = load_delta(deltas[0])
    second, _ = load_delta(deltas[1])
    assert meta["config"]["model"]["family"] == "var"
    for name in first:
        torch.testing.assert_close(state[name], base[name] + (first[name] - base[name]) + (second[name] - base[name]),
                                   rtol=0, atol=1e-6)
    untouched = next(k for k in base if k not in first)
    assert torch.equal(state[untouched], base[untouched])
    capsys.readouterr()
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(merged), "--prompt", "a church at night", "--out", str(out),
                 "--set", "model.family=var", "--set", "rollout.guidance_weight=3"]) == 0
    tokens = json.loads((out / "tokens.json").read_text())
    assert len(tokens[0]["tokens"]) == 85 and (out / "grid.png").is_file()
    # a delta refuses another base model
    other = save_tiny_var_checkpoint(tmp_path / "other", seed=3)
    assert main(["merge", "--base", str(other), "--delta", deltas[0], "--out", str(tmp_path / "bad")]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_shards_with_stored_rollouts_train_like_the_pairs_file(world, tmp_path):
    """Pairs carrying the teacher's 85-token rollouts, written to WebDataset shards, train the same delta as the
    same pairs read from JSONL; tokens of another length are refused, naming the pair."""
    from ear_dist.models.family import load_model

    d, model, pairs = world
    bundle = load_model(str(model), "var", device="cpu", dtype="float32")
    tokens = bundle.sample([p["modified_prompt"] for p in PAIRS], guidance_weight=3.0, seeds=[0, 1, 2])
    rows = [{"target": p["original_prompt"], "surrogate": p["modified_prompt"], "concept": "church", "seed": i,
             "surrogate_tokens": tokens[i].tolist()} for i, p in enumerate(PAIRS)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["data", "build", "--pairs", str(jsonl), "--out", str(tmp_path / "shards")]) == 0
    extra = ["erase.update_mode=sequence", "data.shuffle=false"]  # the same order from both sources
    from_jsonl = run_erase(load_config(overrides=_overrides(model, jsonl, tmp_path / "jsonl", *extra)), progress=False)
    from_shards = run_erase(load_config(overrides=_overrides(model, tmp_path / "shards", tmp_path / "sh", *extra)),
                            progress=False)
    assert _max_diff(from_jsonl["delta"], from_shards["delta"]) == 0.0
    rows[1]["surrogate_tokens"] = rows[1]["surrogate_tokens"][:64]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="pair 1 .*'surrogate_tokens' has 64 tokens, the model makes 85"):
        run_erase(load_config(overrides=_overrides(model, bad, tmp_path / "bad", *extra)), progress=False)


def test_array_job_erases_one_concept_per_task_on_the_var_family(slurm_cluster, tmp_path, world):
    from tests.test_slurm_submit import _submit, _write_config

    from ear_dist.slurm.array import collect_from_out_dir

    _, model, _ = world
    (tmp_path / "church.json").write_text(json.dumps(PAIRS[:2]))
    (tmp_path / "barn.json").write_text(json.dumps([
        {"original_prompt": "a barn in a field", "modified_prompt": "a castle in a field", "concept": "barn"},
        {"original_prompt": "an old barn", "modified_prompt": "an old house", "concept": "barn"}]))
    config = _write_config(tmp_path, {
        "model": {"path": str(model), "family": "var"},
        "train": {"steps": 2, "out_dir": "runs", "tensorboard": False},
        "erase": {"loss_threshold": 0}, "trainable": {"first_k_layers": 2},
        "slurm": {"concepts": ["church", "barn"], "concept_pairs": {"church": "church.json", "barn": "barn.json"},
                  "cpus_per_task": 1, "launcher": "srun", "job_name": "var-array"},
    })
    array_id = _submit(slurm_cluster, tmp_path, config, "erase_array")
    records = slurm_cluster.wait_job(array_id, timeout_s=120)
    assert all(r["JobState"] == "COMPLETED" for r in records), records
    deltas = collect_from_out_dir(tmp_path / "runs", ["church", "barn"])
    assert deltas.complete, deltas.report()
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(model), *deltas.merge_args(), "--out", str(merged)]) == 0
    assert load_var(str(merged), device="cpu", dtype="float32").num_image_tokens == 85
