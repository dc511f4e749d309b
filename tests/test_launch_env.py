"""Rank discovery: every launcher's environment turns into the right DistEnv.

Fake environments cover each launcher and the failure messages; real runs under
torchrun and mpirun check that the processes actually form a gloo group. The
Slurm launches run on a real local cluster in test_slurm_launch.py.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from ear_dist.launch.env import (
    DistEnv,
    LaunchError,
    discover,
    expand_nodelist,
    export_env,
    init_process_group,
    master_addr_for_host,
    port_from_job_id,
    threads_per_rank,
)
from ear_dist.launch.hostlist import HostlistError, expand_hostlist, parse_tasks_per_node

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPI_HINT = "mpirun not found: install Open MPI with `bash scripts/install_system_deps.sh`"


# ------------------------------------------------------------------ hostlists
@pytest.mark.parametrize("expression, hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("node[1-3,7],gpu-a[01-02]", ["node1", "node2", "node3", "node7", "gpu-a01", "gpu-a02"]),
    ("n[001-003]", ["n001", "n002", "n003"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("node[5]", ["node5"]),
    ("node[1-2],node[4-5]", ["node1", "node2", "node4", "node5"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a[1-2]b", ["a1b", "a2b"]),
    ("host-1.example.com,host-2.example.com", ["host-1.example.com", "host-2.example.com"]),
    ("gpu[1,3,5-6]", ["gpu1", "gpu3", "gpu5", "gpu6"]),
    ("  node[1-2] ", ["node1", "node2"]),
    ("n[1-2][3-4]", ["n13", "n14", "n23", "n24"]),
    ("a,,b", ["a", "b"]),
    ("", []),
])
def test_hostlist_expands_like_slurm(expression, hosts):
    assert expand_hostlist(expression) == hosts


@pytest.mark.parametrize("expression, message", [
    ("node[1-3", "unclosed"),
    ("node1-3]", "unmatched"),
    ("node[3-1]", "backwards"),
    ("node[a-b]", "bad range"),
    ("node[[1]]", "nested"),
    ("node[]", "bad range"),
    ("node[1-]", "bad range"),
])
def test_hostlist_errors_name_the_bad_part(expression, message):
    with pytest.raises(HostlistError, match=message) as info:
        expand_hostlist(expression)
    assert repr(expression.strip()) in str(info.value)


@pytest.mark.parametrize("expression, counts", [
    ("4", [4]),
    ("1(x2)", [1, 1]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("3,2(x2),1", [3, 2, 2, 1]),
])
def test_tasks_per_node_expands(expression, counts):
    assert parse_tasks_per_node(expression) == counts


@pytest.mark.parametrize("expression", ["2(3)", "x", "2(x)", ""])
def test_tasks_per_node_rejects_garbage(expression):
    with pytest.raises(HostlistError, match="tasks-per-node"):
        parse_tasks_per_node(expression)


def test_nodelist_prefers_scontrol_and_falls_back_to_parser():
    calls = []

    def scontrol(argv):
        calls.append(argv)
        return "alpha\nbeta\n"

    assert expand_nodelist("whatever[1-2]", scontrol) == ["alpha", "beta"]
    assert calls == [["scontrol", "show", "hostnames", "whatever[1-2]"]]
    assert expand_nodelist("node[1-2]", lambda argv: None) == ["node1", "node2"]


def test_port_from_job_id():
    assert port_from_job_id("12345") == 22345
    assert port_from_job_id(50000) == 10000
    assert port_from_job_id("49999") == 59999
    with pytest.raises(LaunchError, match="job id"):
        port_from_job_id("abc")


def test_master_addr_uses_node_addr_when_name_does_not_resolve():
    show_node = "NodeName=node1 Arch=x86_64 CoresPerSocket=2\n   NodeAddr=10.1.2.3 NodeHostName=vm\n"
    assert master_addr_for_host("node1", lambda argv: show_node, lambda host: False) == "10.1.2.3"
    assert master_addr_for_host("login7", lambda argv: None, lambda host: True) == "login7"
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        master_addr_for_host("ghost", lambda argv: None, lambda host: False)


# ------------------------------------------------------ fake launcher environments
def no_mpi():
    raise AssertionError("mpi4py must not be needed here")


class FakeMpiWorld:
    """Stands in for mpi4py: a fixed rank/size and rank 0's broadcast value."""

    def __init__(self, rank, size, local=(0, 1), rank0_value=("rank0-host", 31337)):
        self.rank, self.size, self.local, self.rank0_value = rank, size, local, rank0_value
        self.broadcasts = []

    def rank_and_size(self):
        return self.rank, self.size

    def local_rank_and_size(self):
        return self.local

    def broadcast(self, value):
        self.broadcasts.append(value)
        return self.rank0_value


def test_torchrun_env():
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
               "GROUP_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29400",
               "TORCHELASTIC_RUN_ID": "job"}
    assert discover(environ, mpi_world=no_mpi) == DistEnv(
        rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, num_nodes=2,
        master_addr="n0", master_port=29400, launcher="torchrun")


def test_deepspeed_launcher_env():
    environ = {"RANK": "3", "WORLD_SIZE": "6", "LOCAL_RANK": "0", "LOCAL_SIZE": "3",
               "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    env = discover(environ, mpi_world=no_mpi)
    assert (env.launcher, env.rank, env.local_world_size, env.node_rank, env.num_nodes) == \
        ("deepspeed", 3, 3, 1, 2)


def test_hand_set_rank_is_one_node():
    env = discover({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"},
                   mpi_world=no_mpi)
    assert (env.launcher, env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == \
        ("env", 1, 2, 0, 1)


def test_torch_env_without_master_addr_is_an_error():
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        discover({"RANK": "0", "WORLD_SIZE": "2"}, mpi_world=no_mpi)


def test_torchrun_inside_srun_uses_torchrun_values():
    environ = {**SRUN_TASK_ENV, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
               "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_ADDR": "localhost",
               "MASTER_PORT": "40000", "TORCHELASTIC_RUN_ID": "77"}
    env = discover(environ, mpi_world=no_mpi, run_command=lambda argv: None)
    assert (env.launcher, env.rank, env.world_size, env.master_port) == ("torchrun", 3, 4, 40000)
    assert env.job_id == "1"  # the Slurm job, not torchrun's run id


@pytest.mark.parametrize("environ, field", [
    ({"RANK": "zero", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "RANK='zero'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "rank=2"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "master_port=70000"),
])
def test_bad_torch_env_names_the_field(environ, field):
    with pytest.raises(LaunchError, match=field):
        discover(environ, mpi_world=no_mpi)


# Copied from a real `srun -N2 -n2` task on the local cluster (task 1, on node2).
SRUN_TASK_ENV = {
    "SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_TASKS_PER_NODE": "1(x2)", "SLURMD_NODENAME": "node2",
}


def emulated_scontrol(argv):
    """scontrol of a cluster whose node names do not resolve (NodeAddr 127.0.0.1)."""
    if argv[:3] == ["scontrol", "show", "hostnames"]:
        return "\n".join(expand_hostlist(argv[3])) + "\n"
    if argv[:3] == ["scontrol", "show", "node"]:
        return f"NodeName={argv[3]} Arch=x86_64\n   NodeAddr=127.0.0.1 NodeHostName=vm\n"
    return None


def test_srun_task_env():
    env = discover(SRUN_TASK_ENV, run_command=emulated_scontrol, resolves=lambda host: False,
                   mpi_world=no_mpi)
    assert env == DistEnv(rank=1, world_size=2, local_rank=0, local_world_size=1, node_rank=1,
                          num_nodes=2, master_addr="127.0.0.1", master_port=10001,
                          launcher="slurm", job_id="1")


def test_srun_master_is_first_host_when_it_resolves():
    environ = {**SRUN_TASK_ENV, "SLURM_STEP_NODELIST": "gpu-b[07-08]"}
    env = discover(environ, run_command=lambda argv: None, resolves=lambda host: True, mpi_world=no_mpi)
    assert env.master_addr == "gpu-b07"


def test_srun_several_tasks_per_node():
    environ = {**SRUN_TASK_ENV, "SLURM_PROCID": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
               "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "1,2"}
    env = discover(environ, run_command=emulated_scontrol, resolves=lambda host: False, mpi_world=no_mpi)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (2, 3, 1, 2, 1)


def test_srun_overrides_from_env_and_arguments():
    environ = {**SRUN_TASK_ENV, "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "23456"}
    env = discover(environ, run_command=no_mpi, mpi_world=no_mpi)
    assert (env.master_addr, env.master_port) == ("10.9.9.9", 23456)
    env = discover(SRUN_TASK_ENV, master_addr="10.8.8.8", master_port=24680, run_command=no_mpi,
                   mpi_world=no_mpi)
    assert (env.master_addr, env.master_port) == ("10.8.8.8", 24680)


def test_srun_unresolvable_master_without_scontrol_is_an_error():
    with pytest.raises(LaunchError, match="does not resolve"):
        discover(SRUN_TASK_ENV, run_command=lambda argv: None, resolves=lambda host: False,
                 mpi_world=no_mpi)


def test_batch_script_is_one_process_with_the_jobs_master():
    # A batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step.
    environ = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "4",
               "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2"}
    env = discover(environ, run_command=emulated_scontrol, resolves=lambda host: False, mpi_world=no_mpi)
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 10042)


def test_batch_script_on_one_node_without_scontrol_uses_loopback():
    environ = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "cn17", "SLURM_JOB_NUM_NODES": "1"}
    env = discover(environ, run_command=lambda argv: None, resolves=lambda host: False, mpi_world=no_mpi)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 10042)
    with pytest.raises(LaunchError, match="does not resolve"):
        discover({**environ, "SLURM_JOB_NODELIST": "cn[17-18]", "SLURM_JOB_NUM_NODES": "2"},
                 run_command=lambda argv: None, resolves=lambda host: False, mpi_world=no_mpi)


def test_single_process():
    env = discover({}, mpi_world=no_mpi)
    assert (env.launcher, env.rank, env.world_size, env.is_main, env.is_distributed) == \
        ("single", 0, 1, True, False)
    assert 0 < env.master_port < 65536


OMPI_ENV = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def test_mpirun_with_master_in_env_needs_no_mpi4py():
    env = discover({**OMPI_ENV, "MASTER_ADDR": "h0", "MASTER_PORT": "2222"}, mpi_world=no_mpi)
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1,
                          num_nodes=2, master_addr="h0", master_port=2222, launcher="mpi")


def test_mpirun_broadcasts_rank0_address():
    world = FakeMpiWorld(rank=3, size=4)
    env = discover(OMPI_ENV, mpi_world=lambda: world)
    assert (env.master_addr, env.master_port) == ("rank0-host", 31337)
    assert world.broadcasts == [None]  # only rank 0 proposes an address


def test_mpirun_rank0_proposes_its_host_and_a_free_port():
    world = FakeMpiWorld(rank=0, size=2)
    environ = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    discover(environ, mpi_world=lambda: world)
    host, port = world.broadcasts[0]
    assert host == __import__("socket").gethostname() and 0 < port < 65536


def test_mpirun_without_mpi4py():
    one_node = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert discover(one_node, mpi_world=lambda: None).master_addr == "127.0.0.1"
    with pytest.raises(LaunchError, match="mpi4py"):
        discover(OMPI_ENV, mpi_world=lambda: None)


def test_srun_pmix_takes_size_from_mpi_and_layout_from_slurm():
    environ = {**SRUN_TASK_ENV, "PMIX_RANK": "1"}
    # An MPI shared-memory split on emulated nodes would claim one node of 2.
    world = FakeMpiWorld(rank=1, size=2, local=(1, 2), rank0_value=("vm", 5555))
    env = discover(environ, mpi_world=lambda: world, run_command=emulated_scontrol)
    assert env == DistEnv(rank=1, world_size=2, local_rank=0, local_world_size=1, node_rank=1,
                          num_nodes=2, master_addr="vm", master_port=10001, launcher="mpi", job_id="1")


def test_pmix_rank_disagreeing_with_mpi_is_an_error():
    with pytest.raises(LaunchError, match="PMIX_RANK=1"):
        discover({"PMIX_RANK": "1"}, mpi_world=lambda: FakeMpiWorld(rank=0, size=2))
    with pytest.raises(LaunchError, match="mpi4py"):
        discover({"PMIX_RANK": "0"}, mpi_world=lambda: None)


# ------------------------------------------------------------------- exporting
def test_export_env_sets_torch_and_deepspeed_names():
    environ = {}
    env = DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1, num_nodes=2,
                  master_addr="h0", master_port=1234, launcher="slurm")
    exported = export_env(env, environ, on_gpu=False, cpu_count=8)
    assert environ == exported == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "2",
        "NODE_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "OMP_NUM_THREADS": "4"}
    # What export_env wrote, discover reads back as the same rank layout.
    back = discover(environ, mpi_world=no_mpi)
    assert (back.rank, back.world_size, back.local_rank, back.local_world_size,
            back.master_addr, back.master_port) == (3, 4, 1, 2, "h0", 1234)


def test_export_env_threads():
    env = DistEnv(local_world_size=4, world_size=4, rank=0)
    assert export_env(env, {}, on_gpu=False, cpu_count=2)["OMP_NUM_THREADS"] == "1"  # at least 1
    assert "OMP_NUM_THREADS" not in export_env(env, {"OMP_NUM_THREADS": "7"}, on_gpu=False, cpu_count=16)
    assert "OMP_NUM_THREADS" not in export_env(env, {}, on_gpu=True, cpu_count=16)
    assert threads_per_rank(env, {"SLURM_CPUS_PER_TASK": "3"}, cpu_count=64) == 3
    assert threads_per_rank(env, {}, cpu_count=64) == 16


# ------------------------------------------------------------ process groups
def run_python(code, environ, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT, **environ}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_init_process_group_single_rank():
    import torch
    import torch.distributed as dist

    env = discover({}, mpi_world=no_mpi)
    try:
        assert init_process_group(env, timeout_s=10) == "gloo"
        value = torch.tensor([2.5])
        dist.all_reduce(value)
        assert value.item() == 2.5
        assert init_process_group(env) == "gloo"  # already initialized: same group is fine
    finally:
        dist.destroy_process_group()
    with pytest.raises(LaunchError, match="backend"):
        init_process_group(env, backend="mpi")


@pytest.mark.dist
@pytest.mark.slow
def test_missing_rank_fails_rendezvous_with_address():
    proc = run_python("""
        from ear_dist.launch.env import discover, init_process_group
        init_process_group(discover(), timeout_s=3)
    """, {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": str(__import__("ear_dist.launch.env", fromlist=["x"])._free_port())})
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "LaunchError: rank 0 of 2" in stderr and "could not join the gloo process group" in stderr


DEAD_RANK_SCRIPT = """
    import os, time, torch, torch.distributed as dist
    from ear_dist.launch.env import discover, init_process_group
    env = discover()
    init_process_group(env, timeout_s=5)
    if env.rank == 1:
        if os.environ["FAILURE"] == "exit":
            os._exit(3)
        time.sleep(60)  # stuck: alive but never joins the collective
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as error:
        print(f"ERROR after {time.monotonic() - start:.1f}s: {type(error).__name__}: {error}", flush=True)
        os._exit(1)  # a broken gloo group may abort in its destructor; the error is what counts
    print("no error")
"""


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("failure", ["exit", "stuck"])
def test_dead_rank_gives_an_error_not_a_hang(failure):
    from ear_dist.launch.env import _free_port

    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
              "FAILURE": failure}
    procs = [run_python(DEAD_RANK_SCRIPT, {**common, "RANK": str(rank)}) for rank in (0, 1)]
    try:
        stdout, stderr = procs[0].communicate(timeout=90)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 1, (stdout, stderr)
    assert stdout.startswith("ERROR after"), (stdout, stderr)
    seconds = float(stdout.split()[2].rstrip("s:"))
    assert seconds < 30, stdout  # bounded by the 5 s collective timeout, not a hang


# --------------------------------------------------------------- real launchers
def read_reports(stdout):
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(reports, key=lambda report: report["rank"])


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_all_reduce():
    # `python -m torch.distributed.run` is torchrun; --standalone picks a free port.
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "ear_dist.launch.print_env", "--all-reduce", "--timeout-s=30"],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = read_reports(result.stdout)
    assert [r["rank"] for r in reports] == [0, 1], result.stdout
    assert all(r["launcher"] == "torchrun" and r["world_size"] == 2 and r["local_world_size"] == 2
               and r["backend"] == "gloo" and r["all_reduce_sum"] == 3.0 for r in reports), reports


@pytest.mark.dist
@pytest.mark.slow
def test_mpirun_two_processes_all_reduce():
    mpirun = shutil.which("mpirun")
    assert mpirun, MPI_HINT
    start = time.monotonic()
    result = subprocess.run(
        ["timeout", "90", mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
         "-x", "OMP_NUM_THREADS=1", "-x", "OMPI_MCA_btl=self,tcp", "-x", "PYTHONPATH=" + REPO_ROOT,
         sys.executable, "-m", "ear_dist.launch.print_env", "--all-reduce", "--timeout-s=30"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (time.monotonic() - start, result.stdout, result.stderr[-3000:])
    reports = read_reports(result.stdout)
    assert [(r["rank"], r["local_rank"]) for r in reports] == [(0, 0), (1, 1)], result.stdout
    # Rank 0 chose the address and port; mpi4py carried them to rank 1.
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1
    assert all(r["launcher"] == "mpi" and r["all_reduce_sum"] == 3.0 for r in reports), reports
