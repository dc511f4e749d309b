# ---- launch, preemption and requeue (slurm/common/launch.sh) ---------------------------------
# Runs once per srun task: node-local caches (the node name keeps emulated nodes apart).
TASK_PROLOGUE='node_tmp="${EAR_LOCAL_TMP:-${TMPDIR:-/tmp}}/ear-dist-${SLURM_JOB_ID}-${SLURMD_NODENAME}"
mkdir -p "$node_tmp"
export TMPDIR="$node_tmp" TRITON_CACHE_DIR="$node_tmp/triton"
export TORCH_EXTENSIONS_DIR="$node_tmp/torch_extensions" HF_HOME="$node_tmp/hf"'

# torchrun: one agent per node (one process in all needs none). srun: one task per rank,
# placed by SLURM_PROCID. mpi: the same through PMIx, ranks read from mpi4py.
launch_step() {
    if [ "$LAUNCHER" = torchrun ] && [ $((NNODES * RANKS_PER_NODE)) -gt 1 ]; then
        srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task=$((CPUS_PER_RANK * RANKS_PER_NODE)) \
            --kill-on-bad-exit=1 bash -c "$TASK_PROLOGUE"'
            exec "$0" -m torch.distributed.run --nnodes="$1" --nproc_per_node="$2" \
                --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
                "${@:3}"' "$PYTHON" "$NNODES" "$RANKS_PER_NODE" "${RANK_ARGS[@]}" &
    else
        local mpi_flag=()
        [ "$LAUNCHER" = mpi ] && mpi_flag=(--mpi=pmix)
        srun "${mpi_flag[@]}" --nodes="$NNODES" --ntasks-per-node="$RANKS_PER_NODE" \
            --cpus-per-task="$CPUS_PER_RANK" --kill-on-bad-exit=1 bash -c "$TASK_PROLOGUE"'
            exec "$0" "$@"' "$PYTHON" "${RANK_ARGS[@]}" &
    fi
    step_pid=$!
}

if [ "$preempted" = 1 ]; then
    echo "ear-dist: preempted before the ranks started"
    step_rc=$EXIT_PREEMPTED
else
    launch_step
    # wait returns early when the trap runs: wait again until the step has really ended.
    while true; do
        wait "$step_pid"
        step_rc=$?
        kill -0 "$step_pid" 2>/dev/null || break
    done
fi

if [ "$preempted" = 1 ] || [ "$step_rc" = "$EXIT_PREEMPTED" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
        echo "ear-dist: preempted, but already restarted ${SLURM_RESTART_COUNT:-0} times" \
            "(slurm.max_restarts=$MAX_RESTARTS); not requeueing" >&2
        exit "$EXIT_PREEMPTED"
    fi
    echo "ear-dist: requeueing job $SLURM_JOB_ID" \
        "(restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most $MAX_RESTARTS)"
    scontrol requeue "$SLURM_JOB_ID" || exit "$EXIT_PREEMPTED"
    exit 0
fi
echo "ear-dist: step finished with exit code $step_rc"
exit "$step_rc"
