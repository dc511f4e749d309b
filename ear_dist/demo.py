"""``ear-dist demo``: the embedded default job of the README."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default job end to end on the CPU")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ear_dist.cli import main

    prompts = ["a photo of a church", "a red barn in a field", "a castle at night", "a lighthouse by the sea"]
    argv = ["generate", "--model", "tiny", "--out", args.out]
    for p in prompts:
        argv += ["--prompt", p]
    return main(argv)
