# ---- job environment (slurm/common/job_env.sh) ------------------------------------------------
set -uo pipefail

# ---- preemption: Slurm sends USR1 before the time limit (#SBATCH --signal=B:USR1@N) -------
preempted=0
on_preempt() {
    echo "ear-dist: preemption signal at $(date -u +%FT%TZ); asking the ranks to checkpoint and stop"
    preempted=1
    # SIGTERM to every task of the step (torchrun passes it on to its workers); a signal to
    # srun itself would make it kill the step without a grace period.
    scancel --signal=TERM "$SLURM_JOB_ID"
}
# Installed first, so an early USR1 cannot end this script unhandled.
trap on_preempt USR1

PYTHON={{python}}
EAR_CONFIG={{config_file}}
EAR_CONFIG_SHA256={{config_sha256}}
LAUNCHER={{launcher}}
NNODES={{nodes}}
RANKS_PER_NODE={{ranks_per_node}}
CPUS_PER_RANK={{cpus_per_rank}}
MAX_RESTARTS={{max_restarts}}
EXIT_PREEMPTED=75

export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# Collectives fail with an error instead of hanging when a rank dies (older and newer
# PyTorch spellings); NCCL prints warnings only unless the user asks for more.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One rank's share of the CPUs (slurm.cpus_per_task is per rank).
export OMP_NUM_THREADS=$CPUS_PER_RANK
# Node-local scratch for compiler and model caches ("" = $TMPDIR or /tmp on each node).
export EAR_LOCAL_TMP={{local_tmp}}
{{setup_lines}}

echo "ear-dist: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
    "$NNODES nodes x $RANKS_PER_NODE ranks, $LAUNCHER"

# The job runs exactly the config that was validated at submit time.
echo "$EAR_CONFIG_SHA256  $EAR_CONFIG" | sha256sum --check --status || {
    echo "ear-dist: $EAR_CONFIG is missing or changed after submission (sha256 differs);" \
        "run ear-dist submit again" >&2
    exit 2
}
# GPUs of this allocation against slurm.gpus_per_node, before any training starts.
"$PYTHON" -m ear_dist slurm-env --config "$EAR_CONFIG" --check-gpus || exit $?

# Rendezvous: the first host of the allocation (its NodeAddr when the name does not
# resolve) and a port derived from the job id; every srun task derives the same values.
launch_env=$("$PYTHON" -m ear_dist.launch.print_env --shell) || exit $?
eval "$launch_env"
echo "ear-dist: rendezvous at $MASTER_ADDR:$MASTER_PORT"
