"""Where erasure damage comes from on the planted-concept world (``benchmarks/harness/damage.py``).

Erases "church" with the world's EAR settings for a short and the default number of steps, then
prints what each object's held-out prompts draw, a random-direction control of the same norms,
and the KL between the base and erased models before and after CFG.

    python benchmarks/world_damage.py [--short-steps 10] [--prompts 48] [--out runs/damage] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ear_dist.config import add_config_args, config_from_args  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short-steps", type=int, default=10, help="steps of the short erasure run")
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts per object")
    p.add_argument("--out", default="runs/damage", help="where the erasure runs write their deltas")
    add_config_args(p)
    args = p.parse_args(argv)
    from benchmarks.harness.damage import run_damage
    from ear_dist.paths import directory_path

    cfg = config_from_args(args)
    directory_path(args.out, "--out")
    run_damage(cfg, args.short_steps, args.prompts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
