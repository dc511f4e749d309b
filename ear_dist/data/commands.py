"""``ear-dist data build`` (pairs -> optional visual filter -> shards) and ``ear-dist data inspect``."""

from __future__ import annotations

from pathlib import Path

from ear_dist.config import ConfigError, add_config_args, config_from_args
from ear_dist.errors import InputError


def register(sub) -> None:
    data = sub.add_parser("data", help="prompt pairs: build WebDataset shards, inspect them")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    build = data_sub.add_parser("build", help="read/generate pairs, optionally filter them visually, write shards")
    build.add_argument("--pairs", action="append", default=[], metavar="FILE",
                       help="a pairs file to add to data.pairs (repeatable)")
    build.add_argument("--out", default=None, help="shard directory (default: data.shards.out_dir)")
    build.add_argument("--jsonl", default=None, metavar="FILE",
                       help="also write the final pairs (after the visual filter) as JSONL")
    build.add_argument("--overwrite", action="store_true",
                       help="replace --out even if it exists and was not written by `ear-dist data build` "
                            "(never an input)")
    add_config_args(build)
    build.set_defaults(func=run_build)

    inspect = data_sub.add_parser("inspect", help="print a shard directory's index and counts")
    inspect.add_argument("shard_dir", help="a directory written by `ear-dist data build`")
    inspect.add_argument("--verify", action="store_true", help="open every shard and check it against the index")
    inspect.add_argument("--show", type=int, default=0, metavar="N", help="print the first N pairs")
    inspect.set_defaults(func=run_inspect)


def collect_pairs(cfg, extra_files: list[str]) -> list:
    """Pairs from the configured files and the configured ECG source, de-duplicated by id."""
    from ear_dist.data.ecg import LLMPairGenerator, LLMSettings, template_pairs
    from ear_dist.data.readers import ReadReport, read_pairs

    d = cfg.data
    concept = d.ecg.concept or cfg.erase.concept
    files = ([d.pairs] if d.pairs else []) + list(extra_files)
    if d.format == "shards":
        raise ConfigError("data.format=shards: `data build` reads pair files; point data.pairs at them")
    pairs = []
    for path in files:
        report = ReadReport()
        got = read_pairs(path, d.format, d.on_error, concept=concept, report=report)
        print(f"read {report.read} pairs from {path} ({report.format}); skipped {report.skipped}")
        for reason in report.skip_reasons[:5]:
            print(f"  skipped: {reason}")
        if report.skipped > 5:
            print(f"  ... and {report.skipped - 5} more")
        pairs += got
    e = d.ecg
    if e.source == "templates":
        made = template_pairs(concept, e.templates, e.surrogates, e.slots, e.num_pairs, e.seed, e.category)
        print(f"ECG templates: {len(made)} pairs for {concept!r}")
        pairs += made
    elif e.source == "llm":
        settings = LLMSettings(
            base_url=e.llm_base_url, models=e.llm_models, api_key_env=e.llm_api_key_env,
            pairs_per_request=e.llm_pairs_per_request, temperature=e.llm_temperature,
            max_retries=e.llm_max_retries, backoff_s=e.llm_backoff_s,
            requests_per_minute=e.llm_requests_per_minute, timeout_s=e.llm_timeout_s,
            cache_dir=e.llm_cache_dir, max_requests=e.llm_max_requests,
            require_concept_word=e.require_concept_word,
        )
        generator = LLMPairGenerator(settings)
        made = generator.generate(concept, e.num_pairs, e.category)
        print(f"ECG chat: {len(made)} pairs for {concept!r}; {generator.stats.summary()}")
        pairs += made
    unique, seen = [], set()
    for pair in pairs:
        if pair.id not in seen:
            seen.add(pair.id)
            unique.append(pair)
    if len(unique) < len(pairs):
        print(f"dropped {len(pairs) - len(unique)} duplicate pairs")
    return unique


def run_build(args) -> int:
    from tqdm import tqdm

    from ear_dist.data.readers import write_jsonl
    from ear_dist.data.shards import ShardWriter
    from ear_dist.data.vf import VisualFilter, build_classifier, teacher_functions

    from ear_dist.paths import finish_dir, output_dir, output_file, removed_on_error, temp_sibling

    cfg = config_from_args(args)
    d = cfg.data
    inputs = [("pairs file", f) for f in ([d.pairs] if d.pairs else []) + list(args.pairs)]
    out = output_dir(args.out or d.shards.out_dir, "data build", overwrite=args.overwrite, protect=inputs,
                     flag="--out" if args.out else "data.shards.out_dir")
    if args.jsonl:
        output_file(args.jsonl, "--jsonl", protect=inputs)
    pairs = collect_pairs(cfg, args.pairs)
    if not pairs:
        raise InputError("no pairs: set data.pairs (or --pairs FILE) or data.ecg.source=templates|llm")
    if d.vf.enabled:
        from ear_dist.models.family import load_model

        classifier = build_classifier(
            d.vf.classifier, d.vf.classifier_path, d.vf.threshold, d.vf.nudenet_classes or None,
            d.vf.class_ids, d.vf.labels, d.vf.top_k,
        )
        bundle = load_model(cfg.model.path, cfg.model.family, device=cfg.model.device, dtype=cfg.model.dtype,
                            seed=cfg.model.seed)
        r = cfg.rollout
        generate, decode = teacher_functions(bundle, r.guidance_weight, r.temperature, r.top_k, r.batch_size,
                                             r.decode)
        vf = VisualFilter(generate, decode, classifier, d.vf.batch_size, d.vf.store_target_tokens, d.vf.seed)
        pairs = vf.run(pairs, progress=True)
        print(vf.report.summary())
        if not pairs:
            raise InputError("the visual filter kept no pairs; nothing to write")
    provenance = {"data": cfg.to_dict()["data"], "model": cfg.to_dict()["model"], "rollout": cfg.to_dict()["rollout"]}
    tmp = temp_sibling(out)
    with removed_on_error(tmp):
        with ShardWriter(tmp, d.shards.max_samples_per_shard, d.shards.max_shard_bytes, config=provenance) as writer:
            for pair in tqdm(pairs, desc="writing shards", unit="pair"):
                writer.write(pair)
        index = writer.close()
    finish_dir(tmp, out, "data build")
    if args.jsonl:  # after the shards are in place: a --jsonl inside --out is not replaced with the old directory
        write_jsonl(pairs, args.jsonl)
        print(f"wrote {len(pairs)} pairs to {args.jsonl}")
    print(f"wrote {index['total_samples']} pairs in {len(index['shards'])} shards to {out} "
          f"(config hash {index['config_hash']})")
    return 0


def run_inspect(args) -> int:
    from ear_dist.data.shards import ShardDataset, read_index, verify_shards

    index = read_index(args.shard_dir)
    root = Path(args.shard_dir)
    print(f"{root}: {index['total_samples']} pairs in {len(index['shards'])} shards, config hash {index.get('config_hash', '?')}")
    width = max((len(s["name"]) for s in index["shards"]), default=4)
    print(f"  {'shard':<{width}}  {'samples':>8}  {'bytes':>12}")
    for shard in index["shards"]:
        print(f"  {shard['name']:<{width}}  {shard['samples']:>8}  {shard.get('bytes', 0):>12}")
    print("concepts:")
    for concept, count in sorted(index.get("concept_counts", {}).items(), key=lambda kv: -kv[1]):
        print(f"  {concept or '(none)'}: {count}")
    bad = 0
    if args.verify:
        problems = verify_shards(root)
        for problem in problems:
            print(f"  BAD {problem}")
        bad = len(problems)
        print(f"verified: {len(index['shards']) - bad} good, {bad} bad")
    if args.show:
        dataset = ShardDataset(root, shuffle=False, on_corrupt="skip")
        for n, pair in enumerate(dataset):
            if n >= args.show:
                break
            tokens = "" if pair.surrogate_tokens is None else f"  [{len(pair.surrogate_tokens)} surrogate tokens]"
            print(f"  {pair.id} [{pair.concept}] {pair.target!r} -> {pair.surrogate!r}{tokens}")
    return 1 if bad else 0
