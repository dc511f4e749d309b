"""Slurm jobs without a cluster: rendering, checks before submitting, in-job checks, preemption, array outputs.

What a user would notice if these broke: a rendered script that runs another config than
the one checked, a placeholder left in a script, an array job that starts training for a
concept without pairs or for an index past the concept list, a job that asks for more
GPUs than it got and fails late, a preemption signal that kills the run instead of
letting it checkpoint, a merge that silently skips a concept whose delta is missing.
"""

import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from ear_dist.cli import main
from ear_dist.config import load_config
from ear_dist.models.delta import compare_changes
from ear_dist.slurm.array import collect_from_out_dir
from ear_dist.slurm.checks import (SlurmJobError, array_task_env, check_allocation, check_partition,
                                   concept_dir_name, gpus_in_gres, visible_gpus)
from ear_dist.slurm.preempt import EXIT_PREEMPTED, PreemptionError, PreemptionHandler, restart_count
from ear_dist.slurm.render import TEMPLATES, render_job, render_text
from ear_dist.models.delta import save_delta

CHURCH = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a house", "concept": "church"}]


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _array_cfg(tmp_path, *overrides):
    church = _write(tmp_path / "church.json", CHURCH)
    van = _write(tmp_path / "van.json", [{"unsafe_prompt": "a Van Gogh painting", "safe_prompt": "a painting",
                                          "concept": "Van Gogh", "category": "style"}])
    return load_config(overrides=[
        f"train.out_dir={tmp_path / 'runs'}", "slurm.concepts=[church, Van Gogh]",
        f"slurm.concept_pairs={{church: {church}, Van Gogh: {van}}}", *overrides])


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_renders_without_leftover_placeholders(tmp_path, template):
    cfg = _array_cfg(tmp_path, f"data.pairs={tmp_path / 'church.json'}")
    job = render_job(cfg, template, cwd=tmp_path)
    assert not re.search(r"\{\{\s*[A-Za-z_]", job.text)
    assert job.text.startswith("#!/bin/bash\n")
    # The script checks the config it runs against the digest of what was validated.
    digest = hashlib.sha256(job.config.read_bytes()).hexdigest()
    assert f"EAR_CONFIG_SHA256={digest}" in job.text
    assert job.config.parent == job.script.parent
    assert load_config([job.config]).train.out_dir == str(tmp_path / "runs")
    syntax = subprocess.run(["bash", "-n", str(job.script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_directives_follow_the_launch_mode(tmp_path):
    cfg = _array_cfg(tmp_path, "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.cpus_per_task=6",
                     "slurm.partition=gpu", "slurm.signal_before_s=300", "slurm.extra_sbatch=[--account=abc]")
    torchrun = render_job(cfg, "erase_multinode", cwd=tmp_path).text
    for line in ("--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=48", "--gpus-per-node=8",
                 "--partition=gpu", "--signal=B:USR1@300", "--requeue", "--account=abc"):
        assert f"#SBATCH {line}\n" in torchrun
    assert "RANKS_PER_NODE=8\n" in torchrun and "LAUNCHER=torchrun\n" in torchrun
    srun = render_job(load_config(base=cfg.to_dict(), overrides=["slurm.launcher=srun"]), "erase_multinode",
                      cwd=tmp_path).text
    assert "#SBATCH --ntasks-per-node=8\n" in srun and "#SBATCH --cpus-per-task=6\n" in srun
    array = render_job(load_config(base=cfg.to_dict(), overrides=["slurm.array_parallel=1"]), "erase_array",
                       cwd=tmp_path).text
    assert "#SBATCH --array=0-1%1\n" in array and "%x-%A_%a.out" in array
    bench = render_job(cfg, "bench", cwd=tmp_path).text  # the bench runs on the whole allocation
    assert "#SBATCH --nodes=4\n" in bench and "#SBATCH --gpus-per-node=8\n" in bench
    assert "RANKS_PER_NODE=8\n" in bench and f"BENCH_OUT={tmp_path / 'runs' / 'bench'}\n" in bench
    # the one-rank baseline does one rank's share of the work: 64 pairs over 32 ranks
    weak = render_job(load_config(base=cfg.to_dict(), overrides=["train.pairs_per_step=64"]), "bench",
                      cwd=tmp_path).text
    assert '--out "$BENCH_OUT/one-rank" --set train.pairs_per_step=2 &' in weak
    with pytest.raises(SlurmJobError, match="slurm.bench_args: --out is set by the bench template"):
        render_job(load_config(base=cfg.to_dict(), overrides=["slurm.bench_args=--steps 3 --out x"]), "bench",
                   cwd=tmp_path)


def test_rank_args_default_to_erase_with_the_resolved_config(tmp_path):
    cfg = _array_cfg(tmp_path)
    job = render_job(cfg, "erase_multinode", cwd=tmp_path)
    assert f"RANK_ARGS=(-m ear_dist erase --no-progress --config {job.config})" in job.text
    print_env = load_config(base=cfg.to_dict(), overrides=["slurm.rank_args=-m ear_dist.launch.print_env --all-reduce"])
    swapped = render_job(print_env, "erase_multinode", cwd=tmp_path)
    assert "RANK_ARGS=(-m ear_dist.launch.print_env --all-reduce)" in swapped.text


def test_a_misspelt_placeholder_is_named(tmp_path):
    with pytest.raises(SlurmJobError, match=r"placeholder \{\{nodez\}\} has no value"):
        render_text("#SBATCH --nodes={{nodez}}", {"nodes": "2"}, tmp_path)


# ------------------------------------------------------------------- before submitting
def _submit(tmp_path, cfg, capsys, *extra):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg))
    rc = main(["submit", "--config", str(cfg_file), "--template", "erase_array", "--dry-run", *extra])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("case, message", [
    ("no_entry", "concept 'Van Gogh' has no pairs file in slurm.concept_pairs"),
    ("missing_file", "pairs file .*gone.json of concept 'Van Gogh' does not exist"),
    ("empty_file", "pairs file .*empty.json of concept 'Van Gogh' holds no prompt pairs"),
])
def test_a_concept_without_pairs_stops_submit(tmp_path, capsys, case, message):
    church = _write(tmp_path / "church.json", CHURCH)
    pairs = {"church": str(church)}
    if case == "missing_file":
        pairs["Van Gogh"] = str(tmp_path / "gone.json")
    if case == "empty_file":
        pairs["Van Gogh"] = str(_write(tmp_path / "empty.json", []))
    cfg = {"train": {"out_dir": str(tmp_path / "runs")},
           "slurm": {"concepts": ["church", "Van Gogh"], "concept_pairs": pairs}}
    rc, out = _submit(tmp_path, cfg, capsys)
    assert rc == 2
    assert re.search(message, out.err), out.err
    assert not (tmp_path / "runs" / "slurm").exists()  # nothing rendered


def test_check_partition_reads_sinfo_gres():
    sinfo = "debug*|2|gpu:2\nbig|3|gpu:h100:8(S:0-1),shard:4\ncpu|5|(null)\n"

    def run(argv):
        return sinfo

    cfg = load_config(overrides=["slurm.gpus_per_node=3"])
    with pytest.raises(SlurmJobError, match="3 GPUs per node asked for, but the nodes of partition debug have at most"):
        check_partition(cfg, run)
    assert check_partition(load_config(overrides=["slurm.gpus_per_node=8", "slurm.partition=big"]), run).nodes == 3
    with pytest.raises(SlurmJobError, match="slurm.nodes: 4 nodes asked for, partition big has 3"):
        check_partition(load_config(overrides=["slurm.nodes=4", "slurm.partition=big"]), run)
    with pytest.raises(SlurmJobError, match="partition 'nope' is not in sinfo"):
        check_partition(load_config(overrides=["slurm.partition=nope"]), run)
    assert check_partition(cfg, lambda argv: None) is None  # no sinfo: the in-job check still runs
    assert [gpus_in_gres(g) for g in ("gpu:2", "gpu:a100:4(S:0),gpu:v100:2", "(null)", "shard:4")] == [2, 6, 0, 0]


def test_tasks_per_node_beyond_gpus_is_a_config_error():
    with pytest.raises(Exception, match="slurm.tasks_per_node: 4 ranks per node but slurm.gpus_per_node is 2"):
        load_config(overrides=["slurm.gpus_per_node=2", "slurm.tasks_per_node=4"])


# --------------------------------------------------------------------------- in the job
def test_allocation_with_fewer_gpus_than_asked_fails_clearly():
    cfg = load_config(overrides=["slurm.gpus_per_node=2"])
    assert check_allocation(cfg, {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "2"}) == 2
    with pytest.raises(SlurmJobError, match="asks for 2 GPUs per node, but the allocation on node7 has 1"):
        check_allocation(cfg, {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "3", "SLURMD_NODENAME": "node7"})
    with pytest.raises(SlurmJobError, match="has 0 .none of CUDA_VISIBLE_DEVICES"):
        check_allocation(cfg, {})
    assert check_allocation(load_config(), {}) is None  # CPU job
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"})[0] == 0


def test_array_task_index_selects_the_concept_or_fails(tmp_path):
    cfg = _array_cfg(tmp_path)
    env = array_task_env(cfg, {"SLURM_ARRAY_TASK_ID": "1"})
    assert env["EAR_CONCEPT"] == "Van Gogh" and env["EAR_CONCEPT_YAML"] == '"Van Gogh"'
    assert env["EAR_CONCEPT_OUT_DIR"] == str(tmp_path / "runs" / "Van_Gogh")
    with pytest.raises(SlurmJobError, match=r"SLURM_ARRAY_TASK_ID=2 is out of range: .* has 2 concepts \(array"):
        array_task_env(cfg, {"SLURM_ARRAY_TASK_ID": "2"})
    with pytest.raises(SlurmJobError, match="SLURM_ARRAY_TASK_ID is unset"):
        array_task_env(cfg, {})
    assert concept_dir_name("yes") == "yes" and load_config(overrides=[f"erase.concept={env['EAR_CONCEPT_YAML']}"])


# ------------------------------------------------------------------------------ preemption
HANDLER_SCRIPT = """
import sys, time
from ear_dist.slurm.preempt import PreemptionHandler
handler = PreemptionHandler().install()
print("ready", flush=True)
deadline = time.time() + 30
while not handler.requested and time.time() < deadline:
    time.sleep(0.01)  # a training step
print(handler.signal_name, flush=True)
sys.exit(handler.exit_code)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_sets_the_flag_and_the_exit_code(sig):
    proc = subprocess.Popen([sys.executable, "-c", HANDLER_SCRIPT], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 20  # stopped by the flag, not by the loop's deadline
    assert (out.strip(), proc.returncode) == (sig.name, EXIT_PREEMPTED)


def test_handler_restores_previous_handlers_and_requeue_needs_slurm():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
        assert handler.exit_code == 0
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(PreemptionError, match="not running in a Slurm job .SLURM_JOB_ID is unset"):
        PreemptionHandler().requeue(environ={})
    assert restart_count({"SLURM_RESTART_COUNT": "2"}) == 2 and restart_count({}) == 0


# -------------------------------------------------------------------------- array outputs
def test_collect_concept_deltas_reports_found_missing_and_foreign(tmp_path):
    tensors = {"w": torch.zeros(2)}
    save_delta(tmp_path / "church" / "delta.safetensors", tensors, "fp", "base", ["church"], {})
    save_delta(tmp_path / "Van_Gogh" / "delta.safetensors", tensors, "fp", "base", ["nudity"], {})
    found = collect_from_out_dir(tmp_path, ["church", "Van Gogh", "nudity"])
    assert [o.concept for o in found.found] == ["church"]
    assert [o.concept for o in found.missing] == ["Van Gogh", "nudity"]
    assert "trained for ['nudity'], not 'Van Gogh'" in found.missing[0].problem
    assert found.merge_args({"church": 0.5}) == ["--delta", str(tmp_path / "church" / "delta.safetensors"),
                                                 "--weight", "0.5"]
    assert "[2] nudity: MISSING" in found.report() and not found.complete


def test_compare_changes_flags_deltas_that_pull_against_each_other(tmp_path):
    base = {"a": torch.ones(4), "b": torch.zeros(2)}
    up = {"a": torch.tensor([2.0, 1, 1, 1]), "b": torch.tensor([1.0, 0])}
    down = {"a": torch.tensor([0.0, 1, 1, 1]), "b": torch.tensor([-1.0, 0])}
    aside = {"a": torch.tensor([1.0, 3, 1, 1])}
    paths = []
    for name, tensors in (("up", up), ("down", down), ("aside", aside)):
        paths.append(save_delta(tmp_path / f"{name}.safetensors", tensors, "fp", "base", [name], {}))
    up_down, up_aside, down_aside = compare_changes(base, paths)
    assert up_down.shared_tensors == 2 and up_down.cosine == pytest.approx(-1.0) and up_down.opposed
    assert up_aside.shared_tensors == 1 and up_aside.cosine == pytest.approx(0.0) and not up_aside.opposed
    assert down_aside.cosine == pytest.approx(0.0)


def test_submit_without_sbatch_says_so(tmp_path, monkeypatch):
    from ear_dist.slurm.commands import submit_script

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="sbatch is not on PATH: submit from a Slurm login node, or use --dry-run"):
        submit_script(str(tmp_path / "job.sbatch"))


def test_a_missing_model_or_deepspeed_config_stops_submit(tmp_path, capsys):
    church = _write(tmp_path / "church.json", CHURCH)
    cfg = {"model": {"path": str(tmp_path / "no-model")}, "data": {"pairs": str(church)},
           "train": {"out_dir": str(tmp_path / "runs")}}
    cfg_file = _write(tmp_path / "cfg.json", cfg)
    assert main(["submit", "--config", str(cfg_file), "--template", "erase_multinode", "--dry-run"]) == 2
    assert f"model.path: {tmp_path / 'no-model'} does not exist and is not a preset" in capsys.readouterr().err
    cfg["model"]["path"] = "tiny"
    cfg["dist"] = {"deepspeed_config": str(tmp_path / "zero9.json")}
    _write(cfg_file, cfg)
    assert main(["submit", "--config", str(cfg_file), "--template", "erase_multinode", "--dry-run"]) == 2
    assert "dist.deepspeed_config: " in capsys.readouterr().err
