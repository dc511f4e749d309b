"""Print what ``ear_dist.launch.env.discover()`` finds, as one JSON line per process.

    python -m ear_dist.launch.print_env                 # the discovered DistEnv as JSON
    python -m ear_dist.launch.print_env --shell         # export MASTER_ADDR/MASTER_PORT lines
    python -m ear_dist.launch.print_env --all-reduce    # also join the process group and all_reduce

With --all-reduce every rank contributes rank+1 to a sum; the JSON then carries
"all_reduce_sum" (world_size*(world_size+1)/2 when the group works) and the
backend used. The launch tests run this under srun, mpirun and torchrun. In an sbatch script,
`eval "$(python -m ear_dist.launch.print_env --shell)"` gives the address that the
script's srun tasks derive, e.g. for `torchrun --rdzv_endpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys

from ear_dist.launch.env import discover, export_env, init_process_group


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ear_dist.launch.print_env``."""
    parser = argparse.ArgumentParser(prog="python -m ear_dist.launch.print_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shell", action="store_true",
                        help="print shell export lines instead of JSON")
    parser.add_argument("--all-reduce", action="store_true",
                        help="join the process group and all_reduce rank+1 over all ranks")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)

    dist_env = discover()
    if args.shell:
        # Only the rendezvous address: a batch script evaluates these lines and
        # its srun tasks inherit them, so exporting RANK/WORLD_SIZE (those of the
        # batch process) would mislead every task.
        print(f"export MASTER_ADDR={shlex.quote(dist_env.master_addr)}")
        print(f"export MASTER_PORT={dist_env.master_port}")
        return 0

    report = dist_env.to_dict()
    report["hostname"] = socket.gethostname()
    report["slurm_node"] = os.environ.get("SLURMD_NODENAME")
    report["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if args.all_reduce:
        import torch
        import torch.distributed as dist

        report["omp_num_threads"] = export_env(dist_env).get("OMP_NUM_THREADS",
                                                              os.environ.get("OMP_NUM_THREADS"))
        report["backend"] = init_process_group(dist_env, args.backend, args.timeout_s)
        device = "cuda" if report["backend"] == "nccl" else "cpu"
        total = torch.tensor([float(dist_env.rank + 1)], device=device)
        dist.all_reduce(total)
        report["all_reduce_sum"] = total.item()
        dist.destroy_process_group()
    # one write per report: ranks share the pipe, and print() writes text and newline separately
    os.write(sys.stdout.fileno(), (json.dumps(report, sort_keys=True) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
