"""The erasure step across processes (gloo, 2 CPU ranks): same deltas, real partitioning, no hangs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ear_dist.config import load_config
from ear_dist.train.trainer import run_erase

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
    {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"},
    {"original_prompt": "a red church in snow", "modified_prompt": "a red windmill in snow", "concept": "church"},
]
# 1 process and N processes train on the same global batches; tolerance: float
# reduction order over 3 Adam steps at lr 1e-2
TOLERANCE = 1e-4


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _overrides(model, pairs, out, *extra):
    return [f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}", "train.steps=3",
            "erase.window_len=4", "train.pairs_per_step=2", "optim.lr=1e-2", "erase.loss_threshold=0",
            "trainable.first_k_layers=2", *extra]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, overrides, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "ear_dist", "erase", "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _max_diff(a, b):
    da, db = load_file(a), load_file(b)
    assert da.keys() == db.keys()
    return max((da[k] - db[k]).abs().max().item() for k in da)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ear_dist.models.janus import save_tiny_checkpoint

    d = tmp_path_factory.mktemp("dist")
    model = save_tiny_checkpoint(d / "model", seed=0)
    pairs = d / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    return d, model, pairs


@pytest.fixture(scope="module")
def reference(world):
    """One process, no DeepSpeed, colocated teacher: what every other layout must reproduce."""
    d, model, pairs = world
    out = {}
    for mode, settings in UPDATES.items():
        cfg = load_config(overrides=_overrides(model, pairs, d / f"ref-{mode}", *settings))
        out[mode] = run_erase(cfg, progress=False)["delta"]
    return out


UPDATES = {"sequence": ["erase.update_mode=sequence"], "window": ["erase.update_mode=window"],
           "window-cached": ["erase.update_mode=window", "erase.window_prefix=cached"]}


@pytest.mark.parametrize("stage, mode", [("1", "sequence"), ("2", "sequence"), ("3", "sequence"),
                                         ("3_offload", "sequence"), ("2", "window"), ("2", "window-cached")])
def test_two_ranks_under_zero_give_the_one_process_delta(world, reference, stage, mode):
    d, model, pairs = world
    out = d / f"z{stage}-{mode}"
    _torchrun(2, _overrides(model, pairs, out, *UPDATES[mode], f"dist.deepspeed_config=ds_configs/zero{stage}.json"))
    assert _max_diff(reference[mode], out / "delta.safetensors") < TOLERANCE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student_ranks"] == 2


# bf16 at the paper's lr: one process steps float32 master weights as DeepSpeed's ZeRO-2 does,
# so both train the same student. The deltas are bf16: the two runs differ only where float
# reduction order puts a value on the other side of a bf16 rounding boundary (measured on
# 5 steps: 2.9% relative difference of the change, 3.7% of elements one bf16 step apart).
# Adam directly on bf16 weights (what one process did before) misses by 39% and 68%.
BF16_RELATIVE_TOLERANCE = 0.10
BF16_DIFFERING_ELEMENTS = 0.10


def _change_agreement(base_dir, a, b):
    """(relative L2 difference of the two changes to the base, share of elements that differ)."""
    from ear_dist.models.janus import load_janus

    base = dict(load_janus(str(base_dir), device="cpu", dtype="bfloat16").model.named_parameters())
    da, db = load_file(a), load_file(b)
    num = den = differing = total = 0.0
    for k in da:
        change_a, change_b = da[k].float() - base[k].detach().float(), db[k].float() - base[k].detach().float()
        num += (change_a - change_b).pow(2).sum().item()
        den += change_a.pow(2).sum().item()
        differing += (da[k] != db[k]).sum().item()
        total += da[k].numel()
    return (num / den) ** 0.5, differing / total


def test_bf16_one_process_and_two_zero2_ranks_give_the_same_delta(world):
    d, model, pairs = world
    bf16 = ["model.dtype=bfloat16", "optim.lr=1e-4", "train.steps=5", "erase.update_mode=sequence"]
    cfg = load_config(overrides=_overrides(model, pairs, d / "bf16-one", *bf16))
    one = run_erase(cfg, progress=False)["delta"]
    _torchrun(2, _overrides(model, pairs, d / "bf16-two", *bf16, "dist.deepspeed_config=zero2"))
    relative, differing = _change_agreement(model, one, d / "bf16-two" / "delta.safetensors")
    assert relative < BF16_RELATIVE_TOLERANCE and differing < BF16_DIFFERING_ELEMENTS, (relative, differing)
    assert all(t.dtype == torch.bfloat16 for t in load_file(one).values())


def test_streamed_shards_give_the_same_delta_on_one_process_two_ranks_and_every_teacher_placement(world):
    """Shards stream (each rank reads its slice, DataLoader workers prefetch): still the one-process delta."""
    from ear_dist.cli import main
    from ear_dist.data.readers import read_pairs
    from ear_dist.data.shards import write_shards

    d, model, pairs = world
    shards = d / "shards"
    write_shards(read_pairs(pairs), shards, max_samples_per_shard=2)
    here = d / "streamed"
    extra = ["erase.update_mode=sequence", "data.shuffle_buffer=2", *SAMPLING]
    one = run_erase(load_config(overrides=_overrides(model, shards, here / "one", *extra)), progress=False)["delta"]
    _torchrun(2, _overrides(model, shards, here / "zero2", *extra, "data.num_workers=1",
                            "dist.deepspeed_config=ds_configs/zero2.json"))
    assert _max_diff(one, here / "zero2" / "delta.safetensors") < TOLERANCE
    _torchrun(2, _overrides(model, shards, here / "dedicated", *extra, "dist.teacher_placement=dedicated"))
    assert _max_diff(one, here / "dedicated" / "delta.safetensors") < TOLERANCE
    sets = [x for o in _overrides(model, shards, here / "unused", *extra) for x in ("--set", o)]
    assert main(["teacher", "precompute", "--out", str(here / "teacher"), *sets]) == 0
    run_erase(load_config(overrides=_overrides(model, shards, here / "offline", *extra,
                                               "dist.teacher_placement=offline", f"dist.teacher_dir={here / 'teacher'}")),
              progress=False)
    assert _max_diff(one, here / "offline" / "delta.safetensors") == 0.0


# What the teacher computes: rollouts from either prompt, hidden or logit outputs, with the
# unconditional branch; each must train the same student wherever the teacher runs. A cold,
# strongly guided sampler makes the tiny random model's rollouts depend on the prompt.
SAMPLING = ["rollout.guidance_weight=50", "rollout.temperature=0.2"]
REQUESTS = {
    "default": [],
    "target-rollouts": ["erase.rollout_from=target"],
    "logit-guided-target-rollouts": ["erase.rollout_from=target", "erase.target_mode=logit",
                                     "erase.teacher_guidance_weight=3"],
}


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_the_three_teacher_placements_give_the_same_delta(world, request_name):
    d, model, pairs = world
    from ear_dist.cli import main

    extra = ["erase.update_mode=sequence", *SAMPLING, *REQUESTS[request_name]]
    here = d / request_name
    cfg = load_config(overrides=_overrides(model, pairs, here / "colocated", *extra))
    colocated = run_erase(cfg, progress=False)["delta"]

    sets = [x for o in _overrides(model, pairs, here / "unused", *extra) for x in ("--set", o)]
    assert main(["teacher", "precompute", "--out", str(here / "teacher"), *sets]) == 0
    cfg = load_config(overrides=_overrides(model, pairs, here / "offline", *extra, "dist.teacher_placement=offline",
                                           f"dist.teacher_dir={here / 'teacher'}"))
    run_erase(cfg, progress=False)
    assert _max_diff(colocated, here / "offline" / "delta.safetensors") == 0.0

    _torchrun(2, _overrides(model, pairs, here / "dedicated", *extra, "dist.teacher_placement=dedicated"))
    assert _max_diff(colocated, here / "dedicated" / "delta.safetensors") < TOLERANCE
    if request_name != "default":  # the settings really change what is trained: the equalities are not vacuous
        cfg = load_config(overrides=_overrides(model, pairs, here / "as-default", "erase.update_mode=sequence",
                                               *SAMPLING))
        assert _max_diff(run_erase(cfg, progress=False)["delta"], colocated) > 1e-3


def test_an_offline_teacher_of_other_settings_is_refused(world):
    d, model, pairs = world
    from ear_dist.cli import main
    from ear_dist.teacher.offline import OfflineTeacherError

    sets = [x for o in _overrides(model, pairs, d / "unused") for x in ("--set", o)]
    assert main(["teacher", "precompute", "--out", str(d / "teacher-default"), *sets]) == 0
    cfg = load_config(overrides=_overrides(model, pairs, d / "refused", "erase.rollout_from=target",
                                           "dist.teacher_placement=offline", f"dist.teacher_dir={d / 'teacher-default'}"))
    with pytest.raises(OfflineTeacherError, match="rollout_from: precomputed 'surrogate', run 'target'"):
        run_erase(cfg, progress=False)
    other_base = save_tiny_model(d / "other-base", seed=5)
    cfg = load_config(overrides=_overrides(other_base, pairs, d / "refused2", "dist.teacher_placement=offline",
                                           f"dist.teacher_dir={d / 'teacher-default'}"))
    with pytest.raises(OfflineTeacherError, match="precomputed from base model"):
        run_erase(cfg, progress=False)


def save_tiny_model(path, seed):
    from ear_dist.models.janus import save_tiny_checkpoint

    return save_tiny_checkpoint(path, seed=seed)


PRESERVING = {
    "preservation + null space": ["preserve.prompts=[a photo of a barn, a castle at night, a red windmill, a house]",
                                  "preserve.weight=1.0", "preserve.per_step=2", "preserve.nullspace=true",
                                  "erase.reference_prompt=unconditional", "erase.rollout_from=target",
                                  "erase.target_mode=logit"],
    "lora": ["trainable.adapter=lora", "trainable.lora_rank=4"],
    # the world's preserving method: every linear weight of the layers (norm weights selected but frozen)
    "null-space EAR": ["preserve.prompts=[a photo of a barn, a castle at night, a red windmill, a house]",
                       "trainable.modules=all", "preserve.nullspace=true", "preserve.nullspace_energy=0.9999",
                       "preserve.weight=1.0", "preserve.per_step=2", "erase.loss_threshold=0"],
    # the Janus world's preserving method: anchors also from the pairs' own surrogates, each rank reading the file
    "null space on the surrogates": ["preserve.prompts=[a red windmill, a house]", "preserve.surrogates=8",
                                     "trainable.modules=all", "trainable.skip_first_layers=1",
                                     "preserve.nullspace=true", "preserve.nullspace_energy=0.999",
                                     "preserve.weight=3.0", "preserve.per_step=2", "erase.loss_threshold=0"],
}


@pytest.mark.parametrize("name", list(PRESERVING))
def test_two_ranks_give_the_one_process_delta_with_the_preserving_levers(world, name):
    """Anchors drawn by drift, null-space projectors and LoRA edits under ZeRO-2 on 2 ranks: the 1-process delta."""
    d, model, pairs = world
    extra = ["erase.update_mode=sequence", *PRESERVING[name]]
    here = d / name.replace(" ", "-").replace("+", "")
    one = run_erase(load_config(overrides=_overrides(model, pairs, here / "one", *extra)), progress=False)["delta"]
    _torchrun(2, _overrides(model, pairs, here / "two", *extra, "dist.deepspeed_config=ds_configs/zero2.json"))
    assert _max_diff(one, here / "two" / "delta.safetensors") < TOLERANCE


def test_zero3_really_partitions_the_student(world):
    d, model, _ = world
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "tests" / "dist_scripts" / "zero3_partition.py"), str(model)]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        for name, full in r["full"].items():
            assert 0 < r["local"][name] < full, name  # each rank holds a part, not the whole
        assert r["frozen_local"] < r["frozen_full"]
    trainable_total = sum(reports[0]["full"].values())
    assert sum(r["optimizer_elements"] for r in reports) == trainable_total  # optimizer state for trainables only


def test_a_dead_rank_stops_the_others_with_an_error_not_a_hang(world):
    d, model, pairs = world
    script = ROOT / "tests" / "dist_scripts" / "die_after_first_step.py"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, str(script), str(model), str(pairs), str(d / "dead")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        out1, _ = procs[1].communicate(timeout=120)
        assert procs[1].returncode == 17 and "rank 1 exits now" in out1
        out0, _ = procs[0].communicate(timeout=60)  # a hang raises TimeoutExpired here
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    assert procs[0].returncode != 0
    assert any(w in out0 for w in ("Connection closed by peer", "Timed out", "timed out", "Connection reset")), out0[-2000:]
