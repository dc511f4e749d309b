"""Launch layer: turn Slurm, mpirun, torchrun or the deepspeed launcher into one DistEnv.

    from ear_dist.launch import discover, export_env, init_process_group
    dist_env = discover()          # rank, world size, local rank, master address ...
    export_env(dist_env)           # RANK, WORLD_SIZE, ..., OMP_NUM_THREADS on CPU
    init_process_group(dist_env)   # gloo on CPU, nccl on GPU, 60 s collective timeout

Only the standard library is imported here; torch and mpi4py load on demand.
"""

from ear_dist.launch.env import DistEnv, LaunchError, discover, export_env, init_process_group
from ear_dist.launch.hostlist import HostlistError, expand_hostlist

__all__ = ["DistEnv", "LaunchError", "HostlistError", "discover", "export_env",
           "init_process_group", "expand_hostlist"]
