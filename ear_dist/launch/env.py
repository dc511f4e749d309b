"""Rank discovery for every launcher ear-dist runs under.

``discover()`` reads the process's environment and returns one ``DistEnv``, trying
the launchers in this order (the first that matches wins, because launchers nest:
torchrun inside an srun task sees both sets of variables and torchrun's are the
ones that describe the process):

1. torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...
2. MPI: Open MPI's OMPI_COMM_WORLD_* (mpirun) or a bare PMIX_RANK (srun --mpi=pmix);
   mpi4py fills what the environment lacks (world size, master address and port,
   broadcast from rank 0).
3. Slurm: an srun task (SLURM_PROCID with a job step); the master is the first host
   of the step's node list, the port is derived from the job id.
4. otherwise a single process (in a Slurm batch script, with the master address
   and port its srun tasks will derive).

``export_env()`` writes the result back as the variables torch.distributed and
DeepSpeed read; ``init_process_group()`` joins the group with a collective timeout
so a dead rank surfaces as an error instead of a hang.

Nothing heavy is imported at module level: torch and mpi4py are imported only by
the functions that need them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ear_dist.launch.hostlist import expand_hostlist, parse_tasks_per_node

DEFAULT_MASTER_PORT = 29500
# Ports derived from a Slurm job id land in [10000, 60000), clear of the
# well-known range and, on Linux, below the default ephemeral range (32768+) for
# most of it; two jobs collide only if their ids are equal modulo 50000.
JOB_PORT_BASE = 10000
JOB_PORT_SPAN = 50000

# Runs a command and returns its stdout, or None if it is missing or fails.
RunCommand = Callable[[list[str]], "str | None"]
# Returns True if a host name resolves to an address.
Resolves = Callable[[str], bool]


class LaunchError(RuntimeError):
    """The launch environment is inconsistent or the process group cannot form."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 .. world_size-1.
        world_size: number of processes in the job.
        local_rank: rank among the processes on this node.
        local_world_size: number of processes on this node.
        node_rank: index of this node, 0 .. num_nodes-1.
        num_nodes: number of nodes in the job.
        master_addr: host of rank 0's rendezvous store.
        master_port: port of that store.
        launcher: torchrun | deepspeed | env (RANK/WORLD_SIZE set by another
            tool) | mpi | slurm | single.
        job_id: the scheduler's job id, if any (Slurm).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"
    job_id: str | None = None

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes outputs)."""
        return self.rank == 0

    def to_dict(self) -> dict:
        """Plain dict of all fields (for JSON)."""
        return dataclasses.asdict(self)

    def validate(self) -> "DistEnv":
        """Raise LaunchError if the fields contradict each other; return self."""
        problems = []
        if self.world_size < 1:
            problems.append(f"world_size={self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            problems.append(
                f"local_rank={self.local_rank} must be in [0, local_world_size={self.local_world_size})")
        if not 0 <= self.node_rank < self.num_nodes:
            problems.append(f"node_rank={self.node_rank} must be in [0, num_nodes={self.num_nodes})")
        if not 0 < self.master_port < 65536:
            problems.append(f"master_port={self.master_port} is not a TCP port")
        if problems:
            raise LaunchError(f"inconsistent {self.launcher} launch environment: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------- helpers
def run_command(argv: list[str]) -> str | None:
    """stdout of a short command (scontrol, sinfo), or None if it is missing, fails or hangs."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def _int_var(environ: Mapping[str, str], name: str, launcher: str) -> int:
    value = environ.get(name)
    if value is None:
        raise LaunchError(f"{launcher} launch: environment variable {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{launcher} launch: environment variable {name}={value!r} is not an integer") from None


def _optional_int(environ: Mapping[str, str], name: str, launcher: str) -> int | None:
    return _int_var(environ, name, launcher) if name in environ else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def port_from_job_id(job_id: str | int) -> int:
    """Rendezvous port derived from a Slurm job id: 10000 + job_id % 50000.

    Every task of a job computes the same port without talking to the others;
    different jobs sharing a node get different ports.
    """
    digits = re.match(r"\d+", str(job_id))
    if not digits:
        raise LaunchError(f"Slurm job id {job_id!r} has no leading number to derive a port from")
    return JOB_PORT_BASE + int(digits.group(0)) % JOB_PORT_SPAN


def expand_nodelist(nodelist: str, run_command: RunCommand = run_command) -> list[str]:
    """Host names of a Slurm node list: ``scontrol show hostnames`` when it works,
    else the pure-Python parser (which gives the same answer; see launch.hostlist)."""
    out = run_command(["scontrol", "show", "hostnames", nodelist])
    if out and out.strip():
        return out.split()
    return expand_hostlist(nodelist)


def master_addr_for_host(host: str, run_command: RunCommand = run_command,
                         resolves: Resolves = _resolves) -> str:
    """An address for ``host`` that the other nodes can reach.

    A resolvable name is used as is. A Slurm node name that does not resolve (as
    with emulated nodes, or clusters whose node names differ from DNS names) is
    replaced by its NodeAddr from ``scontrol show node``.
    """
    if resolves(host):
        return host
    out = run_command(["scontrol", "show", "node", host]) or ""
    match = re.search(r"\bNodeAddr=(\S+)", out)
    if match:
        return match.group(1)
    raise LaunchError(
        f"master host {host!r} (first host of the Slurm node list) does not resolve and "
        f"`scontrol show node {host}` gave no NodeAddr; set MASTER_ADDR to rank 0's address")


# ------------------------------------------------------------------ launchers
def _from_torch_launcher(environ: Mapping[str, str]) -> DistEnv:
    if "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    elif "CROSS_RANK" in environ:
        launcher = "deepspeed"
    else:
        launcher = "env"  # RANK/WORLD_SIZE set by hand or by another tool
    rank = _int_var(environ, "RANK", launcher)
    world_size = _int_var(environ, "WORLD_SIZE", launcher)
    # Both launchers set the local variables; a hand-set RANK/WORLD_SIZE without
    # them is taken as one node.
    local_rank = _optional_int(environ, "LOCAL_RANK", launcher)
    if local_rank is None:
        local_rank = rank
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local_world_size = (_optional_int(environ, "LOCAL_WORLD_SIZE", launcher)
                        or _optional_int(environ, "LOCAL_SIZE", launcher) or world_size)
    # torchrun: GROUP_RANK; deepspeed: CROSS_RANK/CROSS_SIZE. Both launchers give
    # every node the same number of processes, so the division is exact.
    node_rank = _optional_int(environ, "GROUP_RANK", launcher)
    if node_rank is None:
        node_rank = _optional_int(environ, "CROSS_RANK", launcher)
    if node_rank is None:
        node_rank = rank // local_world_size
    num_nodes = _optional_int(environ, "CROSS_SIZE", launcher)
    if num_nodes is None:
        num_nodes = max(-(-world_size // local_world_size), node_rank + 1)
    master_addr = environ.get("MASTER_ADDR")
    if master_addr is None:
        if world_size > 1:
            raise LaunchError(f"{launcher} launch: RANK/WORLD_SIZE are set but MASTER_ADDR is not")
        master_addr = "127.0.0.1"
    master_port = _optional_int(environ, "MASTER_PORT", launcher) or DEFAULT_MASTER_PORT
    return DistEnv(rank, world_size, local_rank, local_world_size, node_rank, num_nodes,
                   master_addr, master_port, launcher, environ.get("SLURM_JOB_ID"))


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    # A batch script also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is
    # one process: only an srun step (which sets the SLURM_STEP_* variables) is a
    # multi-task launch.
    return "SLURM_PROCID" in environ and (
        "SLURM_STEP_NUM_TASKS" in environ or "SLURM_STEP_ID" in environ)


def _slurm_layout(environ: Mapping[str, str]) -> tuple[int, int, int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size, node_rank, num_nodes) of an srun task."""
    launcher = "slurm"
    rank = _int_var(environ, "SLURM_PROCID", launcher)
    world_size = (_optional_int(environ, "SLURM_STEP_NUM_TASKS", launcher)
                  or _int_var(environ, "SLURM_NTASKS", launcher))
    local_rank = _optional_int(environ, "SLURM_LOCALID", launcher) or 0
    node_rank = _optional_int(environ, "SLURM_NODEID", launcher) or 0
    num_nodes = (_optional_int(environ, "SLURM_STEP_NUM_NODES", launcher)
                 or _optional_int(environ, "SLURM_NNODES", launcher) or 1)
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    counts = parse_tasks_per_node(tasks_per_node) if tasks_per_node else []
    if node_rank < len(counts):
        local_world_size = counts[node_rank]
    else:
        local_world_size = max(world_size // num_nodes, local_rank + 1)
    return rank, world_size, local_rank, local_world_size, node_rank, num_nodes


def _slurm_nodelist(environ: Mapping[str, str]) -> str | None:
    return (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            or environ.get("SLURM_NODELIST"))


def _slurm_master(environ: Mapping[str, str], run_command: RunCommand,
                  resolves: Resolves) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    nodelist = _slurm_nodelist(environ)
    if not nodelist:
        raise LaunchError("slurm launch: SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are both unset; "
                          "set MASTER_ADDR")
    hosts = expand_nodelist(nodelist, run_command)
    if not hosts:
        raise LaunchError(f"slurm launch: node list {nodelist!r} names no host")
    return master_addr_for_host(hosts[0], run_command, resolves)


def _slurm_port(environ: Mapping[str, str]) -> int | None:
    if environ.get("MASTER_PORT"):
        return _int_var(environ, "MASTER_PORT", "slurm")
    if environ.get("SLURM_JOB_ID"):
        return port_from_job_id(environ["SLURM_JOB_ID"])
    return None


def _from_slurm(environ: Mapping[str, str], run_command: RunCommand, resolves: Resolves) -> DistEnv:
    layout = _slurm_layout(environ)
    master_addr = _slurm_master(environ, run_command, resolves)
    master_port = _slurm_port(environ) or DEFAULT_MASTER_PORT
    return DistEnv(*layout, master_addr, master_port, "slurm", environ.get("SLURM_JOB_ID"))


class MpiWorld:
    """The few MPI facts discovery needs, from mpi4py's COMM_WORLD.

    Tests substitute an object with the same three methods.
    """

    def __init__(self):
        from mpi4py import MPI  # initializes MPI; only imported under an MPI launcher

        self._comm = MPI.COMM_WORLD
        self._mpi = MPI

    def rank_and_size(self) -> tuple[int, int]:
        return self._comm.Get_rank(), self._comm.Get_size()

    def local_rank_and_size(self) -> tuple[int, int]:
        local = self._comm.Split_type(self._mpi.COMM_TYPE_SHARED)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    def broadcast(self, value):
        return self._comm.bcast(value, root=0)


def _load_mpi_world() -> MpiWorld | None:
    try:
        return MpiWorld()
    except ImportError:
        return None


def _from_mpi(environ: Mapping[str, str], run_command: RunCommand, resolves: Resolves,
              mpi_world: Callable[[], "MpiWorld | None"]) -> DistEnv:
    launcher = "mpi"
    world = None
    if "OMPI_COMM_WORLD_RANK" in environ:
        rank = _int_var(environ, "OMPI_COMM_WORLD_RANK", launcher)
        world_size = _int_var(environ, "OMPI_COMM_WORLD_SIZE", launcher)
        local_rank = _optional_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", launcher)
        local_world_size = _optional_int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", launcher)
    else:
        # A PMIx launcher (srun --mpi=pmix) gives the rank but not the world size.
        world = mpi_world()
        if world is None:
            raise LaunchError("mpi launch: PMIX_RANK is set but mpi4py is not installed to read "
                              "the world size; install mpi4py or launch with mpirun/srun")
        rank, world_size = world.rank_and_size()
        if rank != _int_var(environ, "PMIX_RANK", launcher):
            raise LaunchError(f"mpi launch: PMIX_RANK={environ['PMIX_RANK']} but MPI says rank {rank}")
        local_rank = local_world_size = None

    slurm_layout = _slurm_layout(environ) if _in_slurm_step(environ) else None
    if local_rank is None or local_world_size is None:
        if slurm_layout is not None:
            # srun knows the node of each task even when "nodes" share a machine,
            # where an MPI shared-memory split would see one node.
            _, _, local_rank, local_world_size, _, _ = slurm_layout
        else:
            local_rank, local_world_size = (world or mpi_world()).local_rank_and_size()
    if slurm_layout is not None:
        node_rank, num_nodes = slurm_layout[4], slurm_layout[5]
    else:
        # mpirun fills each node's slots before the next node (its default mapping).
        node_rank = rank // local_world_size
        num_nodes = max(-(-world_size // local_world_size), node_rank + 1)

    master_addr = environ.get("MASTER_ADDR") or None
    master_port = _optional_int(environ, "MASTER_PORT", launcher) if environ.get("MASTER_PORT") else None
    if master_port is None and slurm_layout is not None:
        master_port = _slurm_port(environ)
    if master_addr is None or master_port is None:
        world = world or mpi_world()
        if world is not None:
            # Rank 0 names itself and a free port; every rank takes rank 0's answer.
            proposal = (socket.gethostname(), _free_port()) if rank == 0 else None
            rank0_host, rank0_port = world.broadcast(proposal)
            master_addr = master_addr or rank0_host
            master_port = master_port or rank0_port
        elif slurm_layout is not None and master_addr is None:
            master_addr = _slurm_master(environ, run_command, resolves)
        elif world_size == local_world_size:
            master_addr = master_addr or "127.0.0.1"
        else:
            raise LaunchError("mpi launch across nodes: MASTER_ADDR is not set and mpi4py is not "
                              "installed to broadcast it; install mpi4py or pass -x MASTER_ADDR")
    return DistEnv(rank, world_size, local_rank, local_world_size, node_rank, num_nodes,
                   master_addr, master_port or DEFAULT_MASTER_PORT, launcher,
                   environ.get("SLURM_JOB_ID"))


def _single(environ: Mapping[str, str], run_command: RunCommand, resolves: Resolves) -> DistEnv:
    job_id = environ.get("SLURM_JOB_ID")
    if job_id and _slurm_nodelist(environ):
        # A batch script: one process, but the address it derives is the one its
        # srun tasks will derive, so a script can hand it to torchrun.
        try:
            master_addr = _slurm_master(environ, run_command, resolves)
        except LaunchError:
            if environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")) != "1":
                raise
            master_addr = "127.0.0.1"  # a one-node job never leaves this machine
        return DistEnv(master_addr=master_addr, master_port=_slurm_port(environ),
                       launcher="single", job_id=job_id)
    master_addr = environ.get("MASTER_ADDR") or "127.0.0.1"
    if environ.get("MASTER_PORT"):
        master_port = _int_var(environ, "MASTER_PORT", "single")
    else:
        master_port = _free_port()  # only this process binds it
    return DistEnv(master_addr=master_addr, master_port=master_port, launcher="single", job_id=job_id)


def discover(environ: Mapping[str, str] | None = None, *, master_addr: str | None = None,
             master_port: int | None = None, run_command: RunCommand = run_command,
             resolves: Resolves = _resolves,
             mpi_world: Callable[[], "MpiWorld | None"] = _load_mpi_world) -> DistEnv:
    """Discover this process's rank, world and rendezvous address from its launcher.

    Args:
        environ: the environment to read (default: os.environ).
        master_addr, master_port: overrides for the rendezvous address; the
            MASTER_ADDR / MASTER_PORT variables override the derived values too.
        run_command, resolves, mpi_world: hooks for scontrol, name resolution and
            mpi4py (tests replace them).

    Returns a validated DistEnv. Raises LaunchError naming the variable at fault.
    """
    environ = os.environ if environ is None else environ
    if master_addr is not None or master_port is not None:
        environ = dict(environ)
        if master_addr is not None:
            environ["MASTER_ADDR"] = master_addr
        if master_port is not None:
            environ["MASTER_PORT"] = str(master_port)

    if "RANK" in environ and "WORLD_SIZE" in environ:
        dist_env = _from_torch_launcher(environ)
    elif "OMPI_COMM_WORLD_RANK" in environ or "PMIX_RANK" in environ:
        dist_env = _from_mpi(environ, run_command, resolves, mpi_world)
    elif _in_slurm_step(environ):
        dist_env = _from_slurm(environ, run_command, resolves)
    else:
        dist_env = _single(environ, run_command, resolves)
    return dist_env.validate()


# ----------------------------------------------------------------- exporting
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def threads_per_rank(dist_env: DistEnv, environ: Mapping[str, str] | None = None,
                     cpu_count: int | None = None) -> int:
    """CPU threads for one rank: Slurm's --cpus-per-task if given, else this
    process's usable cores divided among the ranks on the node; at least 1."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(environ["SLURM_CPUS_PER_TASK"]))
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpu_count // max(1, dist_env.local_world_size))


def export_env(dist_env: DistEnv, environ: dict[str, str] | None = None, *,
               on_gpu: bool | None = None, cpu_count: int | None = None) -> dict[str, str]:
    """Write ``dist_env`` into the environment as torch.distributed and DeepSpeed read it.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE (DeepSpeed's
    name), NODE_RANK, MASTER_ADDR and MASTER_PORT. On CPU (``on_gpu`` False, or
    None and no CUDA device) it also sets OMP_NUM_THREADS to the cores per rank
    unless the user already set it, and applies it to torch if torch is imported.
    Returns the variables it set.
    """
    environ = os.environ if environ is None else environ
    exported = {
        "RANK": dist_env.rank,
        "WORLD_SIZE": dist_env.world_size,
        "LOCAL_RANK": dist_env.local_rank,
        "LOCAL_WORLD_SIZE": dist_env.local_world_size,
        "LOCAL_SIZE": dist_env.local_world_size,
        "NODE_RANK": dist_env.node_rank,
        "MASTER_ADDR": dist_env.master_addr,
        "MASTER_PORT": dist_env.master_port,
    }
    if on_gpu is None:
        on_gpu = _cuda_available()
    if not on_gpu and "OMP_NUM_THREADS" not in environ:
        threads = threads_per_rank(dist_env, environ, cpu_count)
        exported["OMP_NUM_THREADS"] = threads
        if "torch" in sys.modules:
            # torch sizes its thread pool from the variable only at first use.
            sys.modules["torch"].set_num_threads(threads)
    exported = {key: str(value) for key, value in exported.items()}
    environ.update(exported)
    return exported


def init_process_group(dist_env: DistEnv, backend: str = "auto", timeout_s: float = 60):
    """Join the torch.distributed default process group described by ``dist_env``.

    backend "auto" picks nccl when CUDA is available (and binds this rank to GPU
    ``local_rank``), else gloo. ``timeout_s`` bounds the rendezvous and every
    collective, so a rank that died makes the others fail with an error within
    that time instead of hanging. Returns the backend name. Raises LaunchError
    with the address, rank and launcher if the group does not form.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise LaunchError(f"backend {backend!r} is not one of auto, gloo, nccl")
    if dist.is_initialized():
        if dist.get_rank() != dist_env.rank or dist.get_world_size() != dist_env.world_size:
            raise LaunchError(
                f"a process group already exists as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"not rank {dist_env.rank} of {dist_env.world_size}")
        return dist.get_backend()
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(dist_env.local_rank)
        device_id = torch.device("cuda", dist_env.local_rank)
    host = f"[{dist_env.master_addr}]" if ":" in dist_env.master_addr else dist_env.master_addr
    try:
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{host}:{dist_env.master_port}",
            rank=dist_env.rank, world_size=dist_env.world_size,
            timeout=timedelta(seconds=timeout_s), device_id=device_id)
    except Exception as error:  # noqa: BLE001 - re-raised with the launch context
        raise LaunchError(
            f"rank {dist_env.rank} of {dist_env.world_size} ({dist_env.launcher} launch) could not "
            f"join the {backend} process group at {dist_env.master_addr}:{dist_env.master_port} "
            f"within {timeout_s:g} s: {error}. Check that every rank started and that all ranks "
            "agree on MASTER_ADDR and MASTER_PORT.") from error
    return backend
