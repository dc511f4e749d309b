"""``ear-dist bench``: time erasure steps per phase and print tokens/s, MFU, memory and NVML figures."""

from __future__ import annotations

from ear_dist.config import add_config_args


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run N erasure steps on a model (local path or preset) and print the per-phase table",
        description="Runs warm-up + N erasure steps with the config's model, method and settings, and prints "
        "ms/step, share, image tokens/s and MFU per phase (teacher rollout, teacher targets, student "
        "forward/backward, loss, optimizer, data wait), peak memory and NVML power/energy. The same "
        "figures go to TensorBoard, metrics.jsonl and bench.json in --out. Under torchrun, srun or mpirun "
        "every rank runs it (ZeRO stage and teacher placement from the config) and the per-rank figures are "
        "shown as mean, min and max over the ranks, with the communication share.",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the means (default 1)")
    p.add_argument("--out", default=None, help="TensorBoard + metrics.jsonl directory (default <train.out_dir>/bench)")
    p.add_argument("--prompt-len", type=int, default=24,
                   help="prompt length in tokens for presets without a tokenizer (janus-pro-7b)")
    p.add_argument("--baseline", default=None, metavar="BENCH_JSON",
                   help="bench.json of the same bench on one rank: print the scaling efficiency against it")
    p.add_argument(
        "--compare", default=None, metavar="KEY=BASELINE,CANDIDATE",
        help="run the benchmark twice, with KEY=BASELINE then KEY=CANDIDATE, and print ratio rows "
        "(e.g. erase.update_mode=window,sequence)",
    )
    p.set_defaults(func=run_bench)


def parse_compare(text: str) -> tuple[str, str, str]:
    """``key=a,b`` -> (key, a, b); an InputError names what is missing."""
    from ear_dist.errors import InputError

    key, sep, values = text.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or len(parts) != 2 or not all(parts):
        raise InputError(f"--compare {text!r}: expected KEY=BASELINE,CANDIDATE, e.g. erase.update_mode=window,sequence")
    return key.strip(), parts[0], parts[1]


def comparison_ratios(baseline, candidate) -> list:
    """Ratio rows (step time, throughput, then each phase both runs have) for two bench results."""
    from ear_dist.telemetry.report import Ratio

    rows = [
        Ratio("step time", baseline.timing.step_s * 1e3, candidate.timing.step_s * 1e3),
        Ratio(
            "image tokens/s",
            baseline.image_tokens_per_step / baseline.timing.step_s,
            candidate.image_tokens_per_step / candidate.timing.step_s,
            unit="tok/s", higher_is_better=True,
        ),
    ]
    for phase, seconds in baseline.timing.phases.items():
        other = candidate.timing.phases.get(phase)
        if other is not None:
            rows.append(Ratio(phase, seconds * 1e3, other * 1e3))
    return rows


def run_bench(args) -> int:
    from pathlib import Path

    from ear_dist.config import load_config
    from ear_dist.bench.erase import run_erasure_bench
    from ear_dist.bench.scaling import read_baseline
    from ear_dist.telemetry.report import ratio_table

    def config(extra=()):
        return load_config(files=args.config, overrides=list(args.overrides) + list(extra), recipes=args.recipe)

    cfg = config()
    from ear_dist.paths import directory_path

    out = directory_path(args.out or Path(cfg.train.out_dir) / "bench", "--out")
    baseline = read_baseline(args.baseline) if args.baseline else None
    if not args.compare:
        result = run_erasure_bench(cfg, steps=args.steps, warmup=args.warmup, log_dir=out, prompt_len=args.prompt_len,
                                   baseline=baseline)
        if result is not None and result.is_main:  # teacher ranks return None; one rank prints
            print(result.summary())
        return 0
    key, base_value, cand_value = parse_compare(args.compare)
    results = []
    for value in (base_value, cand_value):
        result = run_erasure_bench(config([f"{key}={value}"]), steps=args.steps, warmup=args.warmup,
                                   log_dir=out / f"{key}={value}", prompt_len=args.prompt_len, baseline=baseline)
        if result is not None and result.is_main:
            print(f"== {key}={value}")
            print(result.summary())
        results.append(result)
    if results[0] is not None and results[0].is_main:
        title = (f"comparison in one run, {key}: baseline {base_value}, candidate {cand_value} "
                 f"(ratio > 1: the candidate is better)")
        print(ratio_table(comparison_ratios(results[0], results[1]), title=title))
    return 0
