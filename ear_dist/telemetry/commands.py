"""``ear-dist bench``: time erasure steps per phase and print tokens/s, MFU, memory and NVML figures."""

from __future__ import annotations


def register(sub) -> None:
    from ear_dist.cli import add_config_args

    p = sub.add_parser(
        "bench",
        help="run N erasure steps on a model (local path or preset) and print the per-phase table",
        description="Runs warm-up + N erasure steps with the config's model, method and settings, and prints "
        "ms/step, share, image tokens/s and MFU per phase (teacher rollout, teacher targets, student "
        "forward/backward, loss, optimizer, data wait), peak memory and NVML power/energy. The same "
        "figures go to TensorBoard and metrics.jsonl in --out.",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the means (default 1)")
    p.add_argument("--out", default=None, help="TensorBoard + metrics.jsonl directory (default <train.out_dir>/bench)")
    p.add_argument("--prompt-len", type=int, default=24,
                   help="prompt length in tokens for presets without a tokenizer (janus-pro-7b)")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from pathlib import Path

    from ear_dist.cli import config_from_args
    from ear_dist.telemetry.bench import run_erasure_bench

    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path(cfg.train.out_dir) / "bench"
    result = run_erasure_bench(cfg, steps=args.steps, warmup=args.warmup, log_dir=out, prompt_len=args.prompt_len)
    print(result.summary())
    return 0
