"""`ear-dist submit` on a real two-node Slurm cluster (the ``slurm_cluster`` fixture).

What a user would notice if these broke: an array job whose concepts do not each end
with their own delta and log, deltas that do not compose into a model transformers
loads, a multi-node template whose ranks never meet, bad input (an array index past the
concept list, fewer GPUs than asked for) that starts training anyway, a preempted job
that does not come back, or comes back and starts over instead of finishing.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.slurm_cluster import parse_exit_code

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def _env(cluster):
    return {**cluster.env, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}


def _ear_dist(cluster, tmp_path, *args, timeout=120):
    return subprocess.run([PYTHON, "-m", "ear_dist", *args], env=_env(cluster), cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def _submit(cluster, tmp_path, config, template, *overrides):
    result = _ear_dist(cluster, tmp_path, "submit", "--config", str(config), "--template", template,
                       *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _write_config(tmp_path, data):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(data))
    return path


def _array_setup(tmp_path, model):
    (tmp_path / "church.json").write_text(json.dumps([
        {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a house", "concept": "church"},
        {"original_prompt": "a church on a hill", "modified_prompt": "a house on a hill", "concept": "church"}]))
    (tmp_path / "van_gogh.csv").write_text(
        "unsafe_prompt,safe_prompt\na Van Gogh painting of a field,a painting of a field\n"
        "a Van Gogh style cafe,a cafe\n")
    return _write_config(tmp_path, {
        "model": {"path": str(model)},
        "train": {"steps": 2, "out_dir": "runs", "tensorboard": False},
        "erase": {"window_len": 4, "loss_threshold": 0},
        "trainable": {"first_k_layers": 2},
        "slurm": {"concepts": ["church", "Van Gogh"],
                  "concept_pairs": {"church": "church.json", "Van Gogh": "van_gogh.csv"},
                  "cpus_per_task": 1, "launcher": "srun", "job_name": "erase-array"},
    })


def test_array_job_writes_one_delta_per_concept_and_they_compose(slurm_cluster, tmp_path, tiny_checkpoint, capsys):
    from transformers import JanusForConditionalGeneration

    from ear_dist.cli import main
    from ear_dist.slurm.array import collect_from_out_dir
    from ear_dist.models.delta import load_delta

    config = _array_setup(tmp_path, tiny_checkpoint)
    array_id = _submit(slurm_cluster, tmp_path, config, "erase_array")
    records = slurm_cluster.wait_job(array_id, timeout_s=90)
    logs = {r["ArrayTaskId"]: (tmp_path / "runs" / "slurm" / f"erase-array-{array_id}_{r['ArrayTaskId']}.out")
            for r in records}
    assert sorted(logs) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" for r in records), [(r["JobState"], logs[r["ArrayTaskId"]].read_text())
                                                                 for r in records]
    deltas = collect_from_out_dir(tmp_path / "runs", ["church", "Van Gogh"])
    assert deltas.complete, deltas.report()
    for index, (concept, out) in enumerate([("church", "church"), ("Van Gogh", "Van_Gogh")]):
        tensors, meta = load_delta(tmp_path / "runs" / out / "delta.safetensors")
        assert meta["concepts"] == [concept]
        assert meta["config"]["erase"]["concept"] == concept and meta["config"]["train"]["steps"] == 2
        assert len(tensors) == 8  # q/k/v/o of the first 2 layers
        assert len((tmp_path / "runs" / out / "metrics.jsonl").read_text().splitlines()) == 2
        log = logs[str(index)].read_text()
        assert f"array task {index} erases {concept}" in log and '"steps": 2' in log
        assert "step finished with exit code 0" in log

    resolved = tmp_path / "runs" / "slurm" / "erase-array-erase_array.config.yaml"
    assert main(["array-status", "--config", str(resolved), "--base", str(tiny_checkpoint)]) == 0
    status = capsys.readouterr().out
    assert "[1] Van Gogh: " in status and "cosine" in status and f"--base {tiny_checkpoint}" in status

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_checkpoint), *deltas.merge_args(), "--out", str(merged)]) == 0
    base = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    model = JanusForConditionalGeneration.from_pretrained(merged).state_dict()
    church, _ = load_delta(deltas.found[0].delta)
    van_gogh, _ = load_delta(deltas.found[1].delta)
    for name in church:
        expected = base[name] + (church[name] - base[name]) + (van_gogh[name] - base[name])
        torch.testing.assert_close(model[name], expected, rtol=0, atol=1e-6)


def test_array_index_past_the_concepts_fails_before_training(slurm_cluster, tmp_path, tiny_checkpoint):
    config = _array_setup(tmp_path, tiny_checkpoint)
    result = _ear_dist(slurm_cluster, tmp_path, "submit", "--config", str(config), "--template", "erase_array",
                       "--dry-run")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "runs" / "slurm" / "erase-array-erase_array.sbatch"
    # The array asked for on the command line overrides the script's 0-1.
    array_id = slurm_cluster.run(["sbatch", "--parsable", "--array=2", str(script)], cwd=tmp_path).stdout.strip()
    [record] = slurm_cluster.wait_job(array_id)
    log = (tmp_path / "runs" / "slurm" / f"erase-array-{array_id}_2.out").read_text()
    assert (record["JobState"], parse_exit_code(record)) == ("FAILED", 2), log
    assert "SLURM_ARRAY_TASK_ID=2 is out of range" in log and "array indices 0-1: church, Van Gogh" in log
    assert not (tmp_path / "runs" / "church").exists() and "trainable parameters" not in log


def test_more_gpus_than_the_allocation_fails_at_submit_and_in_the_job(slurm_cluster, tmp_path, tiny_checkpoint):
    config = _array_setup(tmp_path, tiny_checkpoint)
    # sinfo says the nodes have gpu:2.
    result = _ear_dist(slurm_cluster, tmp_path, "submit", "--config", str(config), "--template", "erase_array",
                       "--set", "slurm.gpus_per_node=3")
    assert result.returncode == 2
    assert "slurm.gpus_per_node: 3 GPUs per node asked for, but the nodes of partition debug have at most 2" \
        in result.stderr
    assert not (tmp_path / "runs" / "slurm").exists()
    # A script asking for 2 GPUs, submitted by hand into an allocation with 1.
    result = _ear_dist(slurm_cluster, tmp_path, "submit", "--config", str(config), "--template", "erase_array",
                       "--set", "slurm.gpus_per_node=2", "--dry-run")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "runs" / "slurm" / "erase-array-erase_array.sbatch"
    array_id = slurm_cluster.run(["sbatch", "--parsable", "--array=0", "--gpus-per-node=1", str(script)],
                                 cwd=tmp_path).stdout.strip()
    [record] = slurm_cluster.wait_job(array_id)
    log = (tmp_path / "runs" / "slurm" / f"erase-array-{array_id}_0.out").read_text()
    assert (record["JobState"], parse_exit_code(record)) == ("FAILED", 2), log
    assert "asks for 2 GPUs per node, but the allocation on node1 has 1" in log
    assert "CUDA_VISIBLE_DEVICES='0'" in log and not (tmp_path / "runs" / "church").exists()


# The command every rank runs; the erase entry point replaces it once the distributed engine lands.
ALL_REDUCE = "-m ear_dist.launch.print_env --all-reduce --timeout-s=30"


@pytest.mark.parametrize("launcher", ["torchrun", "srun", "mpi"])
def test_multinode_template_forms_two_by_two_ranks(slurm_cluster, tmp_path, launcher, rank_args=ALL_REDUCE):
    # Open MPI's shared-memory transport would mix up the two emulated nodes (one machine).
    setup = ["export OMPI_MCA_btl=self,tcp"] if launcher == "mpi" else []
    config = _write_config(tmp_path, {"train": {"out_dir": "runs"}, "slurm": {
        "nodes": 2, "tasks_per_node": 2, "cpus_per_task": 1, "launcher": launcher, "job_name": "mn",
        "rank_args": rank_args, "setup": setup}})
    job_id = _submit(slurm_cluster, tmp_path, config, "erase_multinode")
    [record] = slurm_cluster.wait_job(job_id, timeout_s=90)
    log = (tmp_path / "runs" / "slurm" / f"mn-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", log
    reports = sorted((json.loads(line) for line in log.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1, 2, 3], log
    assert all(r["world_size"] == 4 and r["num_nodes"] == 2 and r["local_world_size"] == 2
               and r["all_reduce_sum"] == 10.0 for r in reports), reports
    assert {r["launcher"] for r in reports} == {{"torchrun": "torchrun", "srun": "slurm", "mpi": "mpi"}[launcher]}
    by_node = {}
    for r in reports:
        by_node.setdefault(r["slurm_node"], []).append(r["local_rank"])
    assert {node: sorted(ranks) for node, ranks in by_node.items()} == {"node1": [0, 1], "node2": [0, 1]}
    from ear_dist.launch.env import port_from_job_id
    assert f"rendezvous at 127.0.0.1:{port_from_job_id(job_id)}" in log


# ------------------------------------------------------------------------------ preemption
def _wait_for(predicate, what, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _batch_host(cluster, job_id):
    _wait_for(lambda: (cluster.job_fields(job_id) or [{}])[0].get("BatchHost", "(null)") != "(null)",
              f"job {job_id} to get a node")
    return cluster.job_fields(job_id)[0]["BatchHost"]


def _release_requeued(cluster, job_id, first_host):
    """Start a requeued job now, on the other node.

    Slurm holds a requeued job for its credential lifetime (cred_expire, 120 s by default),
    because the node it ran on refuses the revoked credential until then; the other node
    has never seen it.
    """
    _wait_for(lambda: (cluster.job_fields(job_id) or [{}])[0].get("Restarts") == "1"
              and cluster.job_fields(job_id)[0].get("JobState") == "PENDING", f"job {job_id} to be requeued")
    cluster.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={first_host}", "StartTime=now"])


def test_preemption_handler_requeues_and_the_restart_finishes(slurm_cluster, tmp_path):
    runs = tmp_path / "runs.txt"
    program = (
        "import os, sys, time\n"
        "from ear_dist.slurm.preempt import PreemptionHandler, restart_count\n"
        "handler = PreemptionHandler().install()\n"
        f"log = open({str(runs)!r}, 'a')\n"
        "print('run', restart_count(), file=log, flush=True)\n"
        "if restart_count() == 0:\n"
        "    deadline = time.time() + 60\n"
        "    while not handler.requested and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    print('preempted by', handler.signal_name, file=log, flush=True)\n"
        "    handler.requeue()\n"
        "    sys.exit(handler.exit_code)\n"
        "print('finished', file=log, flush=True)\n"
    )
    (tmp_path / "program.py").write_text(program)
    script = f"#!/bin/bash\nexport PYTHONPATH={REPO_ROOT}\nexec {PYTHON} {tmp_path / 'program.py'}\n"
    job_id = slurm_cluster.sbatch(script, ["--requeue", "--output=/dev/null"])
    _wait_for(lambda: runs.exists() and "run 0" in runs.read_text(), "the first run to start")
    first_host = _batch_host(slurm_cluster, job_id)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    _release_requeued(slurm_cluster, job_id, first_host)
    [record] = slurm_cluster.wait_job(job_id)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1"
    assert runs.read_text().splitlines() == ["run 0", "preempted by SIGUSR1", "run 1", "finished"]


RANK_PROGRAM = """
import os, sys, time
from ear_dist.slurm.preempt import PreemptionHandler, restart_count
handler = PreemptionHandler().install()
rank = os.environ["SLURM_PROCID"]
log = open(sys.argv[1], "a")
print("start", rank, restart_count(), file=log, flush=True)
if restart_count() == 0:
    deadline = time.time() + 60
    while not handler.requested and time.time() < deadline:
        time.sleep(0.05)  # training steps; a checkpoint would be written here
    print("checkpointed", rank, handler.signal_name, file=log, flush=True)
    sys.exit(handler.exit_code)
print("done", rank, file=log, flush=True)
"""


def test_template_forwards_preemption_and_requeues(slurm_cluster, tmp_path):
    events = tmp_path / "events.txt"
    (tmp_path / "rank.py").write_text(RANK_PROGRAM)
    config = _write_config(tmp_path, {"train": {"out_dir": "runs"}, "slurm": {
        "nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "launcher": "srun", "job_name": "pre",
        "rank_args": f"{tmp_path / 'rank.py'} {events}"}})
    job_id = _submit(slurm_cluster, tmp_path, config, "erase_multinode")
    _wait_for(lambda: events.exists() and events.read_text().count("start") == 2, "both ranks to start")
    first_host = _batch_host(slurm_cluster, job_id)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])  # what --signal=B:USR1@N sends
    _release_requeued(slurm_cluster, job_id, first_host)
    [record] = slurm_cluster.wait_job(job_id, timeout_s=60)
    log = (tmp_path / "runs" / "slurm" / f"pre-{job_id}.out").read_text()
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), (log, record)
    lines = sorted(events.read_text().splitlines())
    assert lines == ["checkpointed 0 SIGTERM", "checkpointed 1 SIGTERM", "done 0", "done 1",
                     "start 0 0", "start 0 1", "start 1 0", "start 1 1"], lines
    assert "requeueing job" in log and re.search(r"job \d+ \(restart 1\)", log)


def test_bench_template_scales_over_two_nodes(slurm_cluster, tmp_path, tiny_checkpoint):
    """The bench on one rank (the baseline), then ZeRO-2 on 2 emulated nodes: per-rank spread, communication
    share and scaling efficiency in the log and in bench.json."""
    config = _write_config(tmp_path, {
        "model": {"path": str(tiny_checkpoint)}, "train": {"out_dir": "runs", "pairs_per_step": 2},
        "erase": {"window_len": 8}, "trainable": {"first_k_layers": 2},
        "dist": {"deepspeed_config": os.path.join(REPO_ROOT, "ds_configs", "zero2.json")},
        "slurm": {"nodes": 2, "cpus_per_task": 1, "launcher": "srun", "job_name": "bench",
                  "bench_args": "--steps 1 --warmup 1"}})
    job_id = _submit(slurm_cluster, tmp_path, config, "bench")
    [record] = slurm_cluster.wait_job(job_id, timeout_s=240)
    log = (tmp_path / "runs" / "slurm" / f"bench-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", log[-4000:]
    assert "2 nodes x 1 ranks" in log and "the same bench on one rank first" in log
    assert len(re.findall(r"^step +[\d.]+ +100\.0%", log, re.M)) == 2, log  # baseline and the 2-rank run
    assert "figures of each of the 2 student ranks" in log and "scaling efficiency:" in log, log
    one = json.loads((tmp_path / "runs" / "bench" / "one-rank" / "bench.json").read_text())
    two = json.loads((tmp_path / "runs" / "bench" / "ranks" / "bench.json").read_text())
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["pairs_per_step_per_rank"] == two["pairs_per_step_per_rank"] == 1  # equal work per GPU
    step = two["per_rank"]["step_ms"]
    assert step["min"] <= step["mean"] <= step["max"]
    assert two["per_rank"]["comm_share"]["max"] > 0  # ZeRO-2 gradients crossed the nodes
    assert two["scaling_efficiency"] == pytest.approx(
        two["image_tokens_per_s_per_gpu"] / one["image_tokens_per_s_per_gpu"])


ERASE_WITH_PREEMPTION = """
import json, sys
from ear_dist.config import load_config
from ear_dist.slurm.preempt import PreemptionHandler
from ear_dist.train.trainer import run_erase

handler = PreemptionHandler().install()
summary = run_erase(load_config([sys.argv[1]]), progress=False, should_stop=lambda: handler.requested)
print("SUMMARY " + json.dumps(summary), flush=True)
sys.exit(handler.exit_code if summary.get("stopped") else 0)
"""


def test_preempted_erasure_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, tiny_checkpoint):
    # The erase entry point with the trainer's should_stop hook fed by PreemptionHandler,
    # launched through the multi-node template.
    from ear_dist.models.delta import load_delta

    config = _array_setup(tmp_path, tiny_checkpoint)
    data = json.loads(config.read_text())
    data["data"] = {"pairs": "church.json"}
    data["train"].update({"steps": 20, "tensorboard": False})
    job_config = tmp_path / "runs" / "slurm" / "resume-erase_multinode.config.yaml"
    (tmp_path / "erase.py").write_text(ERASE_WITH_PREEMPTION)
    data["slurm"].update({"job_name": "resume", "rank_args": f"{tmp_path / 'erase.py'} {job_config}"})
    config.write_text(json.dumps(data))
    job_id = _submit(slurm_cluster, tmp_path, config, "erase_multinode")
    metrics = tmp_path / "runs" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, "the first training step", 60)
    first_host = _batch_host(slurm_cluster, job_id)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    _release_requeued(slurm_cluster, job_id, first_host)
    [record] = slurm_cluster.wait_job(job_id, timeout_s=90)
    log = (tmp_path / "runs" / "slurm" / f"resume-{job_id}.out").read_text()
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), log
    first, second = [json.loads(line.split(" ", 1)[1]) for line in log.splitlines() if line.startswith("SUMMARY ")]
    assert first["stopped"] is True and 1 <= first["step"] < 20, first
    assert second["resumed_from"] == first["step"] and second["steps"] == 20, second
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(20)), steps  # every step once: no step lost or trained twice
    _, meta = load_delta(second["delta"])
    assert meta["concepts"] == ["church"]


# ------------------------------------------------------------------------------ real erasure, 2 nodes x 2 ranks
@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_multinode_template_runs_zero3_erasure_on_two_nodes(slurm_cluster, tmp_path, tiny_checkpoint, launcher):
    """The real `ear-dist erase` through erase_multinode: 2 emulated nodes x 2 gloo ranks, DeepSpeed ZeRO-3,
    torchrun c10d rendezvous per node, or srun --mpi=pmix with mpi4py discovery; the delta equals one process's."""
    from safetensors.torch import load_file

    from ear_dist.config import load_config
    from ear_dist.train.trainer import run_erase

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([
        {"original_prompt": f"a {a} church", "modified_prompt": f"a {a} {o}", "concept": "church"}
        for a, o in [("red", "barn"), ("old", "castle"), ("small", "windmill"), ("tall", "lighthouse")]]))
    common = {"model": {"path": str(tiny_checkpoint)}, "data": {"pairs": str(pairs)},
              "train": {"steps": 2, "pairs_per_step": 4, "tensorboard": False},
              "erase": {"window_len": 4, "loss_threshold": 0, "update_mode": "sequence"},
              "optim": {"lr": 0.01}, "trainable": {"first_k_layers": 2}}
    reference = run_erase(load_config(overrides=[f"train.out_dir={tmp_path / 'ref'}"], base=common),
                          progress=False)["delta"]
    setup = ["export OMPI_MCA_btl=self,tcp"] if launcher == "mpi" else []
    config = _write_config(tmp_path, {**common, "train": {**common["train"], "out_dir": "runs"},
                                      "dist": {"deepspeed_config": os.path.join(REPO_ROOT, "ds_configs", "zero3.json")},
                                      "slurm": {"nodes": 2, "tasks_per_node": 2, "cpus_per_task": 1,
                                                "launcher": launcher, "job_name": "z3", "setup": setup}})
    job_id = _submit(slurm_cluster, tmp_path, config, "erase_multinode")
    [record] = slurm_cluster.wait_job(job_id, timeout_s=240)
    log = (tmp_path / "runs" / "slurm" / f"z3-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", log[-4000:]
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["student_ranks"] == 4, summary
    got, want = load_file(tmp_path / "runs" / "delta.safetensors"), load_file(reference)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-4
