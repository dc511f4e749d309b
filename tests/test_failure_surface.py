"""What a user sees when something goes wrong, and in a job log: one line and a documented exit code per
project error, tracebacks with --debug and for bugs, rank-prefixed logs on stderr, the summary alone on
stdout, and the launchers' --local_rank accepted."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ear_dist.cli import main
from ear_dist.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_RUN_FAILURE, InputError, RunFailure
from ear_dist.telemetry.logs import RankFilter

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
         {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"},
         {"original_prompt": "a house by a lake", "modified_prompt": "a barn by a lake", "concept": "church"}]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture()
def pairs_file(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps(PAIRS))
    return f


def _run_args(model, pairs, out, *extra):
    sets = [f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}", "train.steps=2",
            "erase.window_len=4", "trainable.first_k_layers=1", *extra]
    return [x for s in sets for x in ("--set", s)]


def test_the_exit_codes_are_the_documented_ones():
    from ear_dist.slurm.preempt import PreemptionHandler

    assert (EXIT_RUN_FAILURE, EXIT_BAD_INPUT, EXIT_PREEMPTED) == (1, 2, 75)
    assert InputError.exit_code == 2 and RunFailure.exit_code == 1
    handler = PreemptionHandler()
    handler.requested = True
    assert handler.exit_code == 75


def test_a_project_error_is_one_line_and_debug_adds_its_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    rc = main(["erase", "--set", f"data.pairs={missing}", "--set", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"ear-dist: error: data.pairs: {missing}: file not found"]
    rc = main(["erase", "--debug", "--set", f"data.pairs={missing}", "--set", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and "PairsError" in err
    assert err.strip().splitlines()[-1] == f"ear-dist: error: data.pairs: {missing}: file not found"


def test_a_bug_keeps_its_traceback_instead_of_passing_as_a_user_error(monkeypatch, tmp_path):
    """An internal ValueError used to print as one line with exit 2, as if the user had erred."""
    import ear_dist.train.trainer as trainer

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(trainer, "run_erase", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["erase", "--set", f"train.out_dir={tmp_path}"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_local_rank_from_a_launcher_is_accepted(where, capsys):
    flag = "--local_rank=0"
    argv = [flag, "config", "show", "--defaults"] if where == "before" else ["config", "show", "--defaults", flag]
    assert main(argv) == 0
    assert "train:" in capsys.readouterr().out


def test_ranks_prefix_their_logs_and_only_rank_0_prints_what_every_rank_prints_alike(monkeypatch):
    records = []

    def emit(name, level, msg, shared=False):
        record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
        if shared:
            record.shared = True
        return RankFilter().filter(record), getattr(record, "rank", None)

    monkeypatch.setenv("RANK", "1")
    records.append(emit("ear_dist.data", logging.WARNING, "a shard this rank could not read"))
    records.append(emit("ear_dist.data", logging.WARNING, "a pair without its concept word", shared=True))
    records.append(emit("py.warnings", logging.WARNING, "FutureWarning: deprecated"))
    records.append(emit("DeepSpeed", logging.WARNING, "Setting accelerator to CPU"))
    records.append(emit("DeepSpeed", logging.ERROR, "a rank-local failure"))
    assert records == [(True, 1), (False, 1), (False, 1), (False, 1), (True, 1)]
    monkeypatch.setenv("RANK", "0")
    assert emit("ear_dist.data", logging.WARNING, "shared", shared=True) == (True, 0)


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_a_job_log_gets_a_line_per_log_every_steps_and_stdout_only_the_summary(tmp_path, tiny_checkpoint,
                                                                               pairs_file):
    res = subprocess.run([sys.executable, "-m", "ear_dist", "erase",
                          *_run_args(tiny_checkpoint, pairs_file, tmp_path / "run", "train.steps=4",
                                     "train.log_every=2")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # stdout is the summary and nothing else
    assert summary["steps"] == 4
    lines = [ln for ln in res.stderr.splitlines() if "ear_dist.train: step " in ln]
    assert [ln.split("ear_dist.train: ")[1].split(":")[0] for ln in lines] == ["step 1/4", "step 3/4"]
    for ln in lines:  # what a Slurm log shows instead of a progress bar
        assert "[rank 0] INFO" in ln and "loss " in ln and "windows kept " in ln and "image tokens/s" in ln
        assert "data wait " in ln and "RSS " in ln
    assert sum("does not contain the concept 'church'" in ln for ln in res.stderr.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.dist
def test_the_deepspeed_launcher_runs_erase_with_its_local_rank_flag(tmp_path, tiny_checkpoint, pairs_file):
    """``deepspeed --module ear_dist erase ...`` appends --local_rank=N, which used to be rejected."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    res = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", str(port), "--module", "ear_dist",
                          "erase", "--no-progress",
                          *_run_args(tiny_checkpoint, pairs_file, out, "train.pairs_per_step=2",
                                     "dist.deepspeed_config=ds_configs/zero2.json")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student_ranks"] == 2 and summary["steps"] == 2
    ranks = {ln.split("[rank ")[1][0] for ln in res.stderr.splitlines() if "[rank " in ln}
    assert ranks <= {"0", "1"} and "0" in ranks
    # the warning every rank would print alike (a pair without its concept word) comes from rank 0 alone
    assert sum("does not contain the concept 'church'" in ln for ln in res.stderr.splitlines()) == 1
