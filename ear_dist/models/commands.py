"""``ear-dist generate`` (prompts -> image tokens -> PNGs and a grid), ``ear-dist merge`` (deltas -> a full
model) and ``ear-dist convert`` (an original-format Janus-Pro -> the transformers format)."""

from __future__ import annotations

import json
import math
import re
import time

from ear_dist.config import add_config_args, config_from_args
from ear_dist.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample images from a model (local path or preset; model.family picks "
                                         "janus or var)")
    p.add_argument("--model", default=None, help="model directory or preset (default: model.path of the config)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--out", required=True, help="output directory for PNGs, grid.png and tokens.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--delta", action="append", default=[],
                   help="a delta applied in memory before sampling (repeatable; no merged copy is written)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it exists and was not written by `ear-dist generate` (never an input)")
    add_config_args(p)
    p.set_defaults(func=run_generate)

    m = sub.add_parser("merge", help="apply one or more deltas to a base model and save a full model")
    m.add_argument("--base", required=True, help="base model directory (or preset) the deltas were trained from; "
                                                 "its family (janus or var) is read from it")
    m.add_argument("--delta", action="append", required=True, help="delta file (repeatable)")
    m.add_argument("--weight", action="append", type=float, default=None,
                   help="weight per delta (repeatable, same order; default 1.0 each)")
    m.add_argument("--out", required=True, help="output directory (a Janus model loads with from_pretrained, a var model with "
                                                 "ear-dist's loader); an earlier merge output there is replaced, "
                                                 "any other directory only with --overwrite")
    m.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="dtype of the merged weights; auto (default) = the dtype the base checkpoint stores")
    m.add_argument("--eval-report", default=None, metavar="REPORT_JSON",
                   help="report.json of `ear-dist eval`: its results go into the model card")
    m.add_argument("--base-model-id", default="",
                   help="the base's Hugging Face id for the model card, e.g. deepseek-community/Janus-Pro-7B")
    m.add_argument("--no-base-check", action="store_true", help="skip the base-model fingerprint check")
    m.add_argument("--conflicts", choices=["warn", "error", "sum"], default="warn",
                   help="two deltas whose changes to shared tensors point in opposite directions (cosine < 0): "
                        "warn (default), error (refuse to merge), sum (compose silently)")
    m.add_argument("--compose", choices=["sum", "project", "ties"], default="sum",
                   help="how the deltas combine: sum (default: base + sum of the changes), project (each delta's "
                        "linear changes projected off the other concepts' and the kept prompts' layer inputs, then "
                        "summed), ties (trim, elect the sign, average the agreeing entries); docs/models.md")
    m.add_argument("--concept-prompts", action="append", default=[], metavar="CONCEPT=FILE",
                   help="--compose project: prompts of a delta's concept (a .txt, one per line, or a pairs file: its "
                        "targets); default: the pairs its run trained on (data.pairs of its config)")
    m.add_argument("--keep-prompts", default=None, metavar="FILE",
                   help="--compose project: prompts whose outputs no delta may change (.txt or a pairs file)")
    m.add_argument("--project-kept-only", action="store_true",
                   help="--compose project: project off the --keep-prompts' inputs only, not the other concepts'")
    m.add_argument("--project-subspace", choices=["union", "pooled"], default="union",
                   help="--compose project: off the union of each prompt set's principal input subspace (default), "
                        "or off the principal subspace of their pooled inputs (smaller: more of each delta is left)")
    m.add_argument("--compose-energy", type=float, default=0.999,
                   help="--compose project: share of each prompt set's input energy projected off (default 0.999)")
    m.add_argument("--ties-density", type=float, default=0.2,
                   help="--compose ties: share of each delta's entries kept per tensor (default 0.2)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it exists and was not written by `ear-dist merge` (never an input)")
    m.set_defaults(func=run_merge_cmd)

    c = sub.add_parser("convert", help="turn an original-format Janus-Pro checkpoint (deepseek-ai/Janus-Pro-*) "
                                       "into the transformers format, with transformers' own converter")
    c.add_argument("--from", dest="source", required=True, metavar="DIR_ORIGINAL",
                   help="a local copy of an original repository (config.json with language_config, "
                        "pytorch_model*.bin, tokenizer files)")
    c.add_argument("--out", required=True, metavar="DIR_HF", help="where to write the transformers-format model")
    c.add_argument("--converter", default=None, metavar="FILE",
                   help="transformers' convert_janus_weights_to_hf.py, when the installed transformers lacks it")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it exists and was not written by `ear-dist convert` (never an input)")
    c.set_defaults(func=run_convert_cmd)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def run_generate(args) -> int:
    from tqdm import tqdm

    from ear_dist.models.delta import applied_deltas, check_deltas
    from ear_dist.models.family import load_model
    from ear_dist.models.images import make_grid, save_pngs
    from ear_dist.paths import check_input_file, finish_dir, output_dir, temp_sibling

    if args.model:  # --model is model.path: a preset there implies its family like one in --set
        args.overrides = [*args.overrides, f"model.path={json.dumps(args.model)}"]
    cfg = config_from_args(args)
    model = args.model or cfg.model.path
    out = output_dir(args.out, "generate", overwrite=args.overwrite,
                     protect=[("model", model), ("prompts file", args.prompts_file),
                              *[("delta", d) for d in args.delta]])
    if args.images_per_prompt < 1:
        raise InputError(f"--images-per-prompt: must be >= 1, got {args.images_per_prompt}")
    for n, text in enumerate(args.prompt, 1):
        if not text.strip():
            raise InputError(f"--prompt #{n}: empty prompt")
    prompts = list(args.prompt)
    where = [f"--prompt #{n}" for n in range(1, len(prompts) + 1)]
    if args.prompts_file:
        path = check_input_file(args.prompts_file, "--prompts-file")
        if not path.is_file():
            raise InputError(f"--prompts-file: {path}: file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            where += [f"{path}: line {n}" for n, ln in enumerate(lines, 1) if ln.strip()]
            prompts += [ln.strip() for ln in lines if ln.strip()]
        except UnicodeDecodeError as e:
            raise InputError(f"--prompts-file: {path}: not valid UTF-8 (byte offset {e.start}); save it as UTF-8") \
                from None
    if not prompts:
        raise InputError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    bundle = load_model(model, cfg.model.family, device=cfg.model.device,
                        dtype=cfg.model.dtype, seed=cfg.model.seed)
    check_deltas(bundle.model, args.delta)
    if getattr(bundle, "tokenizer", None) is not None and hasattr(bundle, "check_prompt_lengths"):
        bundle.check_prompt_lengths(prompts, where=where)  # before any image: named by file and line
    prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    r = cfg.rollout
    seeds = [args.seed + i for i in range(len(prompts))]
    t0 = time.perf_counter()
    chunks = []
    with applied_deltas(bundle.model, args.delta):
        for s in tqdm(range(0, len(prompts), r.batch_size), desc="generating", unit="batch"):
            chunks.append(
                bundle.sample(prompts[s : s + r.batch_size], r.guidance_weight, r.temperature, r.top_k, r.greedy,
                              seeds[s : s + r.batch_size], decode=r.decode)
            )
        import torch

        tokens = torch.cat(chunks)
        elapsed = time.perf_counter() - t0
        images = bundle.decode(tokens)
    tmp = temp_sibling(out)
    names = [f"{i:04d}-{_slug(p)}" for i, p in enumerate(prompts)]
    save_pngs(images, tmp, names)
    make_grid(images, labels=prompts).save(tmp / "grid.png")
    (tmp / "tokens.json").write_text(json.dumps(
        [{"prompt": p, "seed": s, "tokens": t.tolist()} for p, s, t in zip(prompts, seeds, tokens)]
    ))
    finish_dir(tmp, out, "generate")
    n_tok = tokens.numel()
    print(f"{len(prompts)} images, {n_tok} image tokens in {elapsed:.2f}s ({n_tok / elapsed:.0f} tok/s); "
          f"wrote {out}/grid.png and {len(prompts)} PNGs")
    return 0


def run_merge_cmd(args) -> int:
    from ear_dist.models.family import detect_family
    from ear_dist.models.merge import merge

    for w in args.weight or []:
        if not math.isfinite(w):
            raise InputError(f"--weight {w}: a delta's weight must be a finite number")
    if (detect_family(args.base) or "janus") != "janus":
        if args.compose != "sum":
            raise InputError(f"--compose {args.compose}: composes Janus deltas only; a var base's deltas are summed")
        return _merge_var(args)
    result = merge(args.base, args.delta, args.out, weights=args.weight, dtype=args.dtype,
                   check_base=not args.no_base_check, conflicts=args.conflicts, eval_report=args.eval_report,
                   base_model_id=args.base_model_id, overwrite=args.overwrite, compose=compose_spec(args))
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    for name, owners in result["overlaps"].items():
        print(f"note: {name} is changed by {len(owners)} deltas; their changes are summed")
    for name in result.get("summed", []):
        print(f"note: {name} is no linear weight; the deltas' changes to it are summed")
    for delta, share in result.get("kept_norm", {}).items():
        print(f"note: {delta}: {share:.3f} of its change to the linear weights is left after projection")
    print(f"merged {len(args.delta)} delta(s) by {result['method']} ({result['tensors']} tensors, concepts "
          f"{result['concepts']}) into {args.out} ({result['dtype']}, {result['copied']} non-weight files of the base, "
          "model card README.md)")
    return 0


def compose_spec(args):
    """``--compose`` and its prompts as a ``ComposeSpec`` (None for sum); prompts are read before any model."""
    from ear_dist.models.compose import ComposeSpec, concept_prompts_for, read_prompts_file
    from ear_dist.models.delta import delta_metadata

    if args.compose != "project" and (args.concept_prompts or args.keep_prompts or args.project_kept_only):
        raise InputError("--concept-prompts/--keep-prompts/--project-kept-only: only --compose project reads prompts")
    if args.compose == "sum":
        return None
    if not 0 < args.compose_energy <= 1:
        raise InputError(f"--compose-energy {args.compose_energy}: expected a share in (0, 1]")
    if not 0 < args.ties_density <= 1:
        raise InputError(f"--ties-density {args.ties_density}: expected a share in (0, 1]")
    if args.compose == "ties":
        return ComposeSpec("ties", density=args.ties_density)
    if args.project_kept_only and not args.keep_prompts:
        raise InputError("--project-kept-only: give the prompts to keep with --keep-prompts FILE")
    prompts = [] if args.project_kept_only else concept_prompts_for(args.delta, args.concept_prompts)
    kept = read_prompts_file(args.keep_prompts, "--keep-prompts") if args.keep_prompts else []
    rollout = (delta_metadata(args.delta[0]).get("config") or {}).get("rollout") or {}
    return ComposeSpec("project", tuple(tuple(p) for p in prompts), tuple(kept), args.compose_energy,
                       float(rollout.get("guidance_weight", 5.0)), other_concepts=not args.project_kept_only,
                       subspace=args.project_subspace)


def run_convert_cmd(args) -> int:
    from ear_dist.models.janus.convert import convert

    out = convert(args.source, args.out, converter=args.converter, overwrite=args.overwrite)
    print(f"converted {args.source} into {out}; train with --set model.path={out}")
    return 0


def _merge_var(args) -> int:
    """A next-scale (var) base: deltas applied in float32 and saved in the family's own format."""
    from ear_dist.models.delta import apply_deltas, compare_changes
    from ear_dist.models.family import load_model
    from ear_dist.models.merge import merge_output
    from ear_dist.paths import finish_dir, temp_sibling

    out = merge_output(args.out, args.base, args.delta, args.overwrite)
    bundle = load_model(args.base, "var", device="cpu", dtype="float32")
    if len(args.delta) > 1 and args.conflicts != "sum":
        base_state = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
        for pair in compare_changes(base_state, args.delta):
            if pair.shared_tensors and pair.cosine < 0:
                msg = (f"{pair.first} and {pair.second} change {pair.shared_tensors} shared tensors in opposite "
                       f"directions (cosine {pair.cosine:.3f}); their sum erases each concept less than alone")
                if args.conflicts == "error":
                    raise InputError(msg + " (use --conflicts warn or sum to merge anyway)")
                print(f"warning: {msg}")
    report = apply_deltas(bundle.model, args.delta, args.weight, check_base=not args.no_base_check)
    for name, owners in report["overlaps"].items():
        print(f"note: {name} is changed by {len(owners)} deltas; their changes are summed")
    tmp = temp_sibling(out)
    bundle.save(tmp)
    finish_dir(tmp, out, "merge")
    print(f"merged {len(args.delta)} delta(s) ({report['tensors']} tensors, concepts {report['concepts']}) "
          f"into {args.out} (var family: float32, ear-dist's format)")
    return 0
