"""Launching on a real Slurm cluster: two emulated nodes on this machine.

The cluster comes from the session fixture ``slurm_cluster`` (tests/conftest.py,
tests/slurm_cluster.py). What a user would notice if these broke: sbatch jobs
that never finish or lose their exit code, srun tasks that disagree on rank 0's
address, job arrays whose tasks collide, MPI or torchrun runs that cannot form a
group across nodes.
"""

import json
import os
import sys

import pytest

from ear_dist.launch.env import port_from_job_id
from ear_dist.launch.hostlist import expand_hostlist
from tests.slurm_cluster import parse_exit_code

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TASK_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}


def reports_of(stdout):
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(reports, key=lambda report: report["rank"])


def test_nodes_are_idle_and_partition_has_both(slurm_cluster):
    assert slurm_cluster.node_states() == {"node1": "idle", "node2": "idle"}


@pytest.mark.parametrize("expression", [
    "node[1-3,7],gpu-a[01-02]", "n[08-11]", "n[098-101]", "rack[1-2]-n[1-2]", "n[1-2][3-4]",
    "n[1-2]-[3-4]", "c,node[1-2]", "node[1-2],node[4-5]", "gpu[1,3,5-6]", "a,,b",
])
def test_hostlist_parser_matches_scontrol(slurm_cluster, expression):
    out = slurm_cluster.run(["scontrol", "show", "hostnames", expression]).stdout
    assert expand_hostlist(expression) == out.split()


def test_sbatch_job_runs_and_keeps_exit_code(slurm_cluster, tmp_path):
    marker = tmp_path / "ran.txt"
    ok_job = slurm_cluster.sbatch(f"#!/bin/bash\necho \"$SLURM_JOB_ID on $SLURMD_NODENAME\" > {marker}\n")
    failing_job = slurm_cluster.sbatch("#!/bin/bash\nexit 3\n")
    [ok_record] = slurm_cluster.wait_job(ok_job)
    [failing_record] = slurm_cluster.wait_job(failing_job)
    assert (ok_record["JobState"], parse_exit_code(ok_record)) == ("COMPLETED", 0)
    assert marker.read_text().split()[0] == ok_job
    assert (failing_record["JobState"], parse_exit_code(failing_record)) == ("FAILED", 3)


def test_srun_two_tasks_on_two_nodes_agree_on_master(slurm_cluster):
    result = slurm_cluster.run(["srun", "--nodes=2", "--ntasks=2", PYTHON, "-m", "ear_dist.launch.print_env"],
                               extra_env=TASK_ENV, timeout=60)
    reports = reports_of(result.stdout)
    assert [(r["rank"], r["node_rank"], r["slurm_node"]) for r in reports] == \
        [(0, 0, "node1"), (1, 1, "node2")], result.stdout
    assert all(r["launcher"] == "slurm" and r["world_size"] == 2 and r["num_nodes"] == 2
               and r["local_rank"] == 0 and r["local_world_size"] == 1 for r in reports), reports
    # node1 does not resolve: the master address is its NodeAddr, the port comes from the job id.
    job_id = reports[0]["job_id"]
    assert {(r["master_addr"], r["master_port"], r["job_id"]) for r in reports} == \
        {("127.0.0.1", port_from_job_id(job_id), job_id)}


def test_batch_script_exports_the_master_its_tasks_derive(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    script = (
        "#!/bin/bash\n"
        f"export PYTHONPATH={REPO_ROOT}\n"
        f"eval \"$({PYTHON} -m ear_dist.launch.print_env --shell)\"\n"
        "echo \"batch $MASTER_ADDR $MASTER_PORT\"\n"
        f"srun {PYTHON} -m ear_dist.launch.print_env\n"
    )
    job_id = slurm_cluster.sbatch(script, ["--nodes=2", "--ntasks=2", f"--output={out}"])
    [record] = slurm_cluster.wait_job(job_id)
    text = out.read_text()
    assert record["JobState"] == "COMPLETED", text
    batch_line = next(line for line in text.splitlines() if line.startswith("batch "))
    assert batch_line.split()[1:] == ["127.0.0.1", str(port_from_job_id(job_id))]
    reports = reports_of(text)
    assert [r["rank"] for r in reports] == [0, 1]
    assert {(r["master_addr"], r["master_port"]) for r in reports} == {("127.0.0.1", port_from_job_id(job_id))}


def test_job_array_of_three_tasks(slurm_cluster, tmp_path):
    script = (
        "#!/bin/bash\n"
        f"export PYTHONPATH={REPO_ROOT}\n"
        f"{PYTHON} -m ear_dist.launch.print_env --shell > {tmp_path}/task_$SLURM_ARRAY_TASK_ID.txt\n"
        f"echo \"array $SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURM_JOB_ID\" >> {tmp_path}/task_$SLURM_ARRAY_TASK_ID.txt\n"
    )
    array_id = slurm_cluster.sbatch(script, ["--array=0-2", "--output=/dev/null"])
    records = slurm_cluster.wait_job(array_id)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2"], records
    assert all(r["JobState"] == "COMPLETED" for r in records), records
    ports = set()
    for task in range(3):
        lines = (tmp_path / f"task_{task}.txt").read_text().splitlines()
        _, job, task_id, task_job_id = lines[-1].split()
        assert (job, task_id) == (array_id, str(task))
        # Every array task is its own job, so each gets its own rendezvous port.
        assert f"export MASTER_PORT={port_from_job_id(task_job_id)}" in lines
        ports.add(port_from_job_id(task_job_id))
    assert len(ports) == 3


def test_fake_gpus_are_allocated_per_node(slurm_cluster):
    result = slurm_cluster.run(
        ["srun", "--nodes=2", "--ntasks=2", "--gpus-per-node=2", "bash", "-c",
         "echo $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES"], timeout=60)
    assert sorted(result.stdout.split("\n")[:2]) == ["node1 0,1", "node2 0,1"]
    too_many = slurm_cluster.run(["srun", "--nodes=1", "--gpus-per-node=3", "--immediate=5", "true"],
                                 check=False, timeout=60)
    assert too_many.returncode != 0
    assert "Requested node configuration is not available" in too_many.stderr


def test_srun_pmix_mpi4py_discovery_all_reduce(slurm_cluster):
    # Open MPI's shared-memory segments and session directories would collide
    # between the emulated nodes (one machine): TCP only, and a TMPDIR per node.
    # timeout: a broken MPI setup hangs instead of failing.
    per_task = (f"export TMPDIR={slurm_cluster.tmpfs_root}/$SLURMD_NODENAME && "
                f"exec {PYTHON} -m ear_dist.launch.print_env --all-reduce --timeout-s=30")
    result = slurm_cluster.run(
        ["timeout", "90", "srun", "--mpi=pmix", "--nodes=2", "--ntasks=2", "bash", "-c", per_task],
        extra_env={**TASK_ENV, "OMPI_MCA_btl": "self,tcp"}, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = reports_of(result.stdout)
    assert [(r["rank"], r["node_rank"], r["slurm_node"]) for r in reports] == \
        [(0, 0, "node1"), (1, 1, "node2")], result.stdout
    assert all(r["launcher"] == "mpi" and r["world_size"] == 2 and r["all_reduce_sum"] == 3.0
               for r in reports), reports
    # mpi4py carried rank 0's host to rank 1; the port still comes from the job id.
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1


def test_srun_torchrun_two_nodes_by_two_ranks(slurm_cluster):
    # One srun task per node runs torchrun; the c10d rendezvous sits at the
    # address and port every task derives from the job.
    per_node = (
        f"eval \"$({PYTHON} -m ear_dist.launch.print_env --shell)\" && "
        f"exec {PYTHON} -m torch.distributed.run --nnodes=2 --nproc_per_node=2 "
        "--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv_id=$SLURM_JOB_ID "
        "-m ear_dist.launch.print_env --all-reduce --timeout-s=30"
    )
    result = slurm_cluster.run(
        ["timeout", "110", "srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2",
         "bash", "-c", per_node], extra_env=TASK_ENV, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = reports_of(result.stdout)
    assert [r["rank"] for r in reports] == [0, 1, 2, 3], result.stdout
    assert all(r["launcher"] == "torchrun" and r["world_size"] == 4 and r["local_world_size"] == 2
               and r["num_nodes"] == 2 and r["all_reduce_sum"] == 10.0 for r in reports), reports
    # Two torchrun agents, one per Slurm node, each with two local ranks.
    by_node = {}
    for r in reports:
        by_node.setdefault(r["slurm_node"], []).append((r["node_rank"], r["local_rank"]))
    assert sorted(by_node) == ["node1", "node2"]
    assert all(len({node_rank for node_rank, _ in ranks}) == 1 and sorted(lr for _, lr in ranks) == [0, 1]
               for ranks in by_node.values()), by_node
