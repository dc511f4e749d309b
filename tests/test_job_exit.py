"""How a command that joined a process group ends: a finished job exits 0 with its outputs whole,
a rank that fails still fails the job with its own message, and nothing printed is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from ear_dist.distributed.finish import finish_job

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
         {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]
STEPS = 3
WATCHED = ROOT / "tests" / "dist_scripts" / "erase_and_watch_exit.py"  # the ear-dist program, watched


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_called_from_python_the_group_is_released_and_the_code_returned():
    _one_rank_group()
    assert finish_job(3, leave_process=False) == 3
    assert not dist.is_initialized()
    assert finish_job(0, leave_process=False) == 0  # no group: nothing to do


LEAVE = """
import logging, sys
import torch.distributed as dist
from ear_dist.distributed.finish import finish_job
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("job").info("logged before leaving")
sys.stdout.write("printed before leaving")  # a pipe: block-buffered, not yet written
finish_job(4, leave_process=True)
print("after finish_job")
"""


def test_leaving_the_process_keeps_its_code_and_loses_nothing_printed_or_logged(tmp_path):
    log_file = tmp_path / "job.log"
    res = subprocess.run([sys.executable, "-c", LEAVE, str(log_file)], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 4, res.stderr[-2000:]
    assert res.stdout == "printed before leaving"
    assert "logged before leaving" in log_file.read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ear_dist.models.janus import save_tiny_checkpoint

    d = tmp_path_factory.mktemp("exit")
    model = save_tiny_checkpoint(d / "model", seed=0)
    pairs = d / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    return d, model, pairs


def _launch(world, name, program, *extra, env=None):
    """``torchrun --nproc_per_node=2 <program> erase ...`` of a short ZeRO run; its result and out_dir."""
    d, model, pairs = world
    out = d / name
    sets = [f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}", f"train.steps={STEPS}",
            "train.pairs_per_step=2", "erase.window_len=4", "erase.loss_threshold=0", "erase.update_mode=sequence",
            "trainable.first_k_layers=2", "train.log_every=1", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           *program, "erase", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(**(env or {})), capture_output=True, text=True, timeout=300)
    return res, out


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage,dtype", [("zero2", "bfloat16"), ("zero3", "float32")])
def test_a_finished_two_rank_run_exits_0_with_its_outputs_whole(world, stage, dtype):
    res, out = _launch(world, f"done-{stage}", [str(WATCHED)], f"dist.deepspeed_config={stage}", f"model.dtype={dtype}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    # no rank went through interpreter teardown, where gloo threads could abort it
    assert "interpreter teardown ran" not in res.stderr and "terminate called" not in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(res.stdout[res.stdout.index("{"):]) == summary  # the printed summary reached stdout whole
    assert json.loads((out / "run.json").read_text())["finished_step"] == STEPS
    assert load_file(summary["delta"])  # the delta is complete (safetensors checks its header and sizes)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("fail_with,line", [
    ("error", "ear-dist: error (rank 1 of 2): injected failure on rank 1 after the last step"),
    ("bug", "ZeroDivisionError: injected bug on rank 1 after the last step"),
])
def test_a_rank_that_fails_after_the_last_step_fails_the_job_with_its_message(world, fail_with, line):
    res, out = _launch(world, f"fail-{fail_with}", [str(WATCHED)], "dist.deepspeed_config=zero2",
                       env={"FAIL_WITH": fail_with})
    assert res.returncode != 0, res.stderr[-3000:]
    assert line in res.stderr, res.stderr[-3000:]
    assert (out / "delta.safetensors").is_file()  # rank 0 had finished: the failure is rank 1's, after the work
