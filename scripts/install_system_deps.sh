#!/usr/bin/env bash
# Installs the Debian packages that the Slurm and MPI tests need: a real Slurm
# (slurmctld, slurmd, slurm-client) with munge, and Open MPI with PMIx for
# `mpirun` and `srun --mpi=pmix`. Idempotent: when every program is already on
# PATH it returns at once without touching apt.
#
# Usage: bash scripts/install_system_deps.sh
set -euo pipefail

needed_programs=(slurmctld slurmd sinfo munged mpirun)
missing=()
for program in "${needed_programs[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
# libpmix-dev provides the PMIx plugin srun --mpi=pmix loads; no program names it.
if [ ${#missing[@]} -eq 0 ] && ls /usr/lib/*/libpmix.so >/dev/null 2>&1; then
    echo "install_system_deps: slurm, munge and Open MPI already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: apt-get not found; install slurmctld slurmd slurm-client munge openmpi-bin libpmix-dev by hand" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_system_deps: must run as root (apt-get install)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Several jobs may share the machine: wait for the dpkg lock instead of failing.
apt_opts=(-y -q -o DPkg::Lock::Timeout=300)
apt-get "${apt_opts[@]}" update >/dev/null
apt-get "${apt_opts[@]}" install --no-install-recommends \
    slurmctld slurmd slurm-client munge openmpi-bin libpmix-dev >/dev/null
echo "install_system_deps: installed slurm $(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null), munge, $(mpirun --version 2>/dev/null | head -1)"
