"""Slurm at scale: sbatch templates filled from the config tree, in-job checks, preemption, job arrays.

    render.py   fill slurm/*.sbatch from a Config, write the script and its resolved config
    checks.py   validation before submitting (pairs per concept, GPUs and nodes against sinfo)
                and inside the job (GPUs of the allocation, the array task's concept)
    preempt.py  PreemptionHandler: USR1/SIGTERM set a flag; requeue with scontrol
    array.py    the per-concept deltas an array job wrote: which exist, which are missing
"""
