"""A real, throw-away Slurm cluster with two emulated nodes on this machine.

``LocalSlurmCluster`` starts munged, slurmctld and two slurmd daemons (node1 and
node2, Debian's Slurm is built with MULTIPLE_SLURMD) as root, with every file they
use (config, munge key and socket, state, spool, logs, pid files, per-node TmpFS)
under one temporary directory, so several clusters can run side by side and
nothing outside that directory changes. Stopping it ends exactly the daemons it
started, by pid.

    with LocalSlurmCluster() as cluster:
        out = cluster.run(["srun", "-N2", "-n2", "hostname"]).stdout
        job_id = cluster.sbatch("#!/bin/bash\\necho hi\\n")
        cluster.wait_job(job_id)

The client commands (sbatch, srun, scontrol ...) find this cluster through
SLURM_CONF, which ``cluster.env`` carries; jobs inherit it, so ``scontrol`` inside
a job asks the same controller.

The Debian packages come from ``scripts/install_system_deps.sh``. To try sbatch
scripts by hand, ``python -m tests.slurm_cluster`` starts a cluster, prints the
SLURM_CONF line to export in another shell, and stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = (
    "install the system packages with `bash scripts/install_system_deps.sh` "
    "(Debian: slurmctld slurmd slurm-client munge openmpi-bin libpmix-dev; needs root)"
)

REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "scancel", "sbatch", "srun", "scontrol")
NODE_NAMES = ("node1", "node2")
TERMINAL_JOB_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}


class SlurmClusterError(RuntimeError):
    """The local Slurm cluster could not start, or a job on it failed."""


def missing_programs() -> list[str]:
    """Names of the programs the local cluster needs that are not on PATH."""
    return [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_hardware() -> str:
    """CPU/memory description of this machine as ``slurmd -C`` reports it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if not all(key in fields for key in ("CPUs", "RealMemory")):
        raise SlurmClusterError(f"`slurmd -C` gave no node hardware line; it printed: {out!r}")
    return " ".join(f"{key}={fields[key]}" for key in keep if key in fields)


class LocalSlurmCluster:
    """Context manager running a two-node Slurm cluster under a temporary directory.

    Args:
        fake_gpus_per_node: declare this many GPUs per node through gres.conf, each
            a symlink to /dev/null, so ``--gpus-per-node`` allocations (and
            CUDA_VISIBLE_DEVICES) can be tested without a GPU. 0 disables gres.
        start_timeout_s: how long to wait for both nodes to become idle.
        base_dir: parent directory for the cluster's temporary directory.
    """

    def __init__(self, fake_gpus_per_node: int = 2, start_timeout_s: float = 30.0,
                 base_dir: str | None = None):
        self.fake_gpus_per_node = fake_gpus_per_node
        self.start_timeout_s = start_timeout_s
        self._base_dir = base_dir
        self.root: Path | None = None
        self.conf_path: Path | None = None
        self.env: dict[str, str] = {}
        self.nodes = NODE_NAMES
        # Per-node scratch (Slurm's TmpFS=ROOT/tmp/%n). Slurm does not export it as
        # TMPDIR; MPI tests point TMPDIR at ROOT/tmp/$SLURMD_NODENAME themselves so
        # the emulated nodes' Open MPI session directories stay apart.
        self.tmpfs_root: Path | None = None
        self.partition = "debug"
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # ----------------------------------------------------------------- start/stop
    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration and start munged, slurmctld and both slurmd."""
        missing = missing_programs()
        if missing:
            raise SlurmClusterError(f"programs not found: {', '.join(missing)}; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise SlurmClusterError("the local Slurm cluster runs its daemons as root (SlurmUser=root)")
        self.root = Path(tempfile.mkdtemp(prefix="ear-slurm-", dir=self._base_dir))
        self.tmpfs_root = self.root / "tmp"
        try:
            self._write_files()
            self._start_daemons()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Drain jobs, stop the daemons this object started, remove its files."""
        if any(proc.poll() is None for name, proc in self._daemons if name == "slurmctld"):
            self._drain_jobs()
        # Stop in reverse start order: the slurmd daemons, slurmctld, then munged.
        for name, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, proc in reversed(self._daemons):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._daemons = []
        self._kill_own_step_daemons()
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _drain_jobs(self, timeout_s: float = 10.0) -> None:
        # A job still running or completing keeps a slurmstepd that would retry
        # its controller forever once the controller is gone: cancel, then wait
        # until the controller has forgotten every job step.
        self.run(["scancel", "--full", "--partition", self.partition], check=False, timeout=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queue = self.run(["squeue", "-h", "-o", "%i %T"], check=False, timeout=10)
            if queue.returncode == 0 and not queue.stdout.strip():
                return
            time.sleep(0.1)

    def _kill_own_step_daemons(self) -> None:
        """Kill slurmstepd processes left by this cluster's slurmd (found by its SLURM_CONF)."""
        if self.conf_path is None:
            return
        marker = f"SLURM_CONF={self.conf_path}".encode()
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                if (proc_dir / "comm").read_text().strip() != "slurmstepd":
                    continue
                if marker not in (proc_dir / "environ").read_bytes().split(b"\0"):
                    continue
                os.kill(int(proc_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read

    # -------------------------------------------------------------- configuration
    def _write_files(self) -> None:
        root = self.root
        os.chmod(root, 0o755)
        for sub in ("munge", "state", "spool", "log", "run", "tmp", "dev", "jobs"):
            (root / sub).mkdir()
        # munged refuses a socket directory that is not 0755 and a key that is not 0600.
        os.chmod(root / "munge", 0o755)
        key_path = root / "munge" / "munge.key"
        key_path.write_bytes(os.urandom(1024))
        os.chmod(key_path, 0o600)
        for node in self.nodes:
            (root / "tmp" / node).mkdir()
            (root / "spool" / node).mkdir()

        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        hostname = socket.gethostname().split(".")[0]
        hardware = _node_hardware()
        self.munge_socket = root / "munge" / "munge.socket.2"

        gres_line = ""
        node_gres = ""
        if self.fake_gpus_per_node > 0:
            for index in range(self.fake_gpus_per_node):
                (root / "dev" / f"nvidia{index}").symlink_to("/dev/null")
            last = self.fake_gpus_per_node - 1
            files = root / "dev" / (f"nvidia[0-{last}]" if last else "nvidia0")
            (root / "gres.conf").write_text(
                f"NodeName={','.join(self.nodes)} Name=gpu File={files}\n")
            gres_line = "GresTypes=gpu\n"
            node_gres = f" Gres=gpu:{self.fake_gpus_per_node}"

        node_lines = "".join(
            f"NodeName={node} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port} "
            f"{hardware}{node_gres} State=UNKNOWN\n"
            for node, port in zip(self.nodes, node_ports)
        )
        config = (
            "ClusterName=eardist\n"
            f"SlurmctldHost={hostname}(127.0.0.1)\n"
            f"SlurmctldPort={ctld_port}\n"
            "SlurmUser=root\n"
            "SlurmdUser=root\n"
            "AuthType=auth/munge\n"
            "CredType=cred/munge\n"
            f"AuthInfo=socket={self.munge_socket}\n"
            f"StateSaveLocation={root}/state\n"
            f"SlurmdSpoolDir={root}/spool/%n\n"
            f"SlurmctldPidFile={root}/run/slurmctld.pid\n"
            f"SlurmdPidFile={root}/run/slurmd.%n.pid\n"
            f"SlurmctldLogFile={root}/log/slurmctld.log\n"
            f"SlurmdLogFile={root}/log/slurmd.%n.log\n"
            f"TmpFS={root}/tmp/%n\n"
            "ProctrackType=proctrack/linuxproc\n"
            "TaskPlugin=task/none\n"
            "SelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\n"
            "AccountingStorageType=accounting_storage/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "JobCompType=jobcomp/none\n"
            # Without it every batch job waits about 3 s for the scheduler.
            "SchedulerParameters=batch_sched_delay=0\n"
            "MailProg=/bin/true\n"
            "MpiDefault=none\n"
            "ReturnToService=2\n"
            "SlurmctldTimeout=30\n"
            "SlurmdTimeout=30\n"
            "InactiveLimit=0\n"
            "KillWait=5\n"
            "MinJobAge=300\n"
            "SlurmctldDebug=info\n"
            "SlurmdDebug=info\n"
            f"{gres_line}"
            f"{node_lines}"
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=NO\n"
        )
        self.conf_path = root / "slurm.conf"
        self.conf_path.write_text(config)
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf_path)
        # A developer's shell inside another allocation must not leak into this one.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._daemons.append((name, proc))

    def _start_daemons(self) -> None:
        root = self.root
        self._spawn("munged", [
            "munged", "--foreground", "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={root / 'munge' / 'munge.key'}",
            f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ])
        self._wait_for(lambda: self.munge_socket.exists(), "munged to create its socket", 10)
        conf = str(self.conf_path)
        # -i: ignore state files from a previous controller; there are none, but be sure.
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        self._wait_for(self._controller_answers, "slurmctld to answer", 15)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", conf])

    def _controller_answers(self) -> bool:
        return self.run(["scontrol", "ping"], check=False, timeout=5).returncode == 0

    def _wait_for(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_daemons_alive(what)
            if ready():
                return
            time.sleep(0.1)
        raise SlurmClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def _check_daemons_alive(self, what: str) -> None:
        for name, proc in self._daemons:
            if proc.poll() is not None:
                raise SlurmClusterError(
                    f"{name} exited with code {proc.returncode} while waiting for {what}\n{self.logs()}")

    def node_states(self) -> dict[str, str]:
        """Node name -> state as sinfo prints it (idle, alloc, mix, down ...)."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def _wait_idle(self) -> None:
        self._wait_for(
            lambda: all(self.node_states().get(node) == "idle" for node in self.nodes),
            "both nodes to be idle in sinfo", self.start_timeout_s)

    # ------------------------------------------------------------------- clients
    def run(self, argv: list[str], check: bool = True, timeout: float = 120,
            extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run a client command (srun, sbatch, scontrol ...) against this cluster."""
        env = dict(self.env)
        if extra_env:
            env.update(extra_env)
        result = subprocess.run(argv, env=env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
        if check and result.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def sbatch(self, script: str, args: list[str] | None = None) -> str:
        """Submit ``script`` (its text) with sbatch; return the job id."""
        script_path = Path(tempfile.mkstemp(suffix=".sh", dir=self.root / "jobs")[1])
        script_path.write_text(script)
        argv = ["sbatch", "--parsable", f"--chdir={self.root / 'jobs'}", *(args or []), str(script_path)]
        out = self.run(argv).stdout.strip()
        return out.split(";")[0]

    def job_fields(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per job record (array tasks are records)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=10).stdout
        records = []
        for line in out.splitlines():
            fields = {}
            for item in line.split():
                if "=" in item:
                    key, value = item.split("=", 1)
                    fields[key] = value
            if fields:
                records.append(fields)
        return records

    def wait_job(self, job_id: str, timeout_s: float = 60.0) -> list[dict[str, str]]:
        """Poll ``scontrol show job`` until every record of ``job_id`` has ended.

        Faster than ``sbatch --wait``, which polls with a 2-10 s backoff. Returns the
        final records; raises if the job does not end in time.
        """
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            records = self.job_fields(job_id)
            if records and all(rec.get("JobState") in TERMINAL_JOB_STATES for rec in records):
                return records
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise SlurmClusterError(f"job {job_id} did not finish within {timeout_s:.0f} s: "
                                f"{self.job_fields(job_id)}\n{self.logs()}")

    def logs(self, tail_lines: int = 30) -> str:
        """The last lines of every daemon log, for error messages."""
        if self.root is None:
            return ""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def parse_exit_code(record: dict[str, str]) -> int:
    """The job's exit status from a ``scontrol show job`` record ("ExitCode=1:0" -> 1)."""
    match = re.match(r"(\d+):(\d+)", record.get("ExitCode", ""))
    return int(match.group(1)) if match else -1


def main() -> None:
    """Run a local cluster in the foreground until interrupted."""
    with LocalSlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf_path}", flush=True)
        print(f"nodes: {cluster.node_states()}; Ctrl-C stops the cluster", flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
