"""Erasure methods compared on the world: erasure and preservation over world builds and erasure seeds.

For one world build and one erasure seed, a method is run the way a user runs it:

- ``single``: one run per concept (each concept's ECG pairs from the training
  templates, kept by the visual filter);
- ``joint``: one run on several concepts' pairs (as many steps as the single runs together);
- ``composed``: the single runs' deltas summed onto the base (what a Slurm job array
  gives, composed by ``ear-dist merge``); for a method with surrogate anchors each
  per-concept run is trained as an array task would be, knowing the array's concepts
  (``slurm.concepts``), so its anchors leave the other erased concepts out.

Every model is then judged by the world's classifier on its own CFG samples:

- erasure rate of an erased concept: 1 - its hit rate on its prompts (``heldout``: the
  held-out sentence templates with every synonym; ``validation``: the training
  templates, canonical word, prompts and seeds no training pair used;
  ``synonym-validation``: the training templates with the canonical word and, apart, the
  first synonym ("chapel"), so a choice can see whether erasure reaches words training
  never used while the second synonym ("cathedral") stays out of every choice);
- preservation ratio of every other object and style: its hit rate after / before,
  the mean of these ratios and the worst concept (named); a group whose base hit rate
  is 0 has no ratio and is listed as excluded. Every figure is ``ear_dist.eval.figures``'s,
  the definitions ``ear-dist eval`` reports.

Settings are chosen on ``validation`` or ``synonym-validation``; ``heldout`` is for the figures
reported.
Preservation anchors and drift probes come from the training templates of the other
concepts, never from the evaluation prompts.
"""

from __future__ import annotations

import json
import time
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ear_dist.data.pairs import PromptPair
from ear_dist.eval import figures
from ear_dist.errors import InputError, RunFailure
from ear_dist.world.vocabulary import Vocabulary, planted
from ear_dist.world.world import World

SPLITS = ("validation", "synonym-validation", "heldout")
_EVAL_STREAM = {"validation": 41_000, "heldout": 42_000, "synonym-validation": 43_000}
_WORDS = {"validation": 1, "synonym-validation": 2, "heldout": None}  # how many of a concept's words, canonical first
_PROBE_STREAM = 44_000  # anchors: erasure.PRESERVE_ANCHOR_STREAM
CONCEPTS = tuple(planted().concepts)  # the planted world's; a world's own: world.vocab.concepts


def concept_groups(concept: str, split: str, vocab: Optional[Vocabulary] = None) -> dict[str, dict]:
    """The prompt groups that show ``concept`` in a split: name -> world.sample filters (in ``vocab``, default the
    planted world's: its objects' words, canonical first; a style is one group)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    vocab = vocab or planted()
    if vocab.validation_templates and split in ("validation", "heldout"):
        # a generated world: the canonical word and the split's own words (validation or held-out), never a word
        # of the other split; the sentences are that split's templates (hit_rates)
        words = tuple(dict.fromkeys([vocab.words(concept, "train")[0], *vocab.words(concept, split)]))
        if concept in vocab.objects:
            return {f"{concept} ({w})" if w != concept else concept: dict(objects=[concept], object_words=[w],
                                                                         styles=[None]) for w in words}
        if concept in vocab.styles:
            return {f"{concept} ({w})" if w != words[0] else concept: dict(styles=[concept], style_words=[w])
                    for w in words}
    if concept in vocab.objects:
        words = vocab.objects[concept][:_WORDS[split]]
        return {f"{concept} ({w})" if w != concept else concept: dict(objects=[concept], object_words=[w],
                                                                     styles=[None]) for w in words}
    if concept in vocab.styles:
        return {concept: dict(styles=[concept])}
    raise InputError(f"concept {concept!r}: the world's concepts are {', '.join(vocab.concepts)}")


def hit_rates(world: World, bundle, split: str, n: int, guidance_weight: float, batch_size: int = 64,
              draw: int = 0) -> dict[str, float]:
    """Per concept group, the share of the model's own CFG samples in which the classifier finds the concept.

    ``world`` is the world of ``bundle``'s family (``world_for``): it judges the family's image tokens.
    The prompts of a group are fixed by the split; ``draw`` picks another set of sampling seeds for
    them (0: the seeds every comparison uses), which measures the judge's own sampling noise.
    """
    world_split = "heldout" if split == "heldout" else "validation" if (
        split == "validation" and world.vocab.validation_templates) else "train"
    out = {}
    for c_index, concept in enumerate(world.vocab.concepts):
        for g_index, (name, filters) in enumerate(concept_groups(concept, split, world.vocab).items()):
            stream = _EVAL_STREAM[split] + 16 * c_index + g_index
            batch = world.sample(n, world_split, stream=stream, **filters)
            with torch.no_grad():
                tokens = bundle.sample(batch.prompts, guidance_weight=guidance_weight,
                                       seeds=[stream * 1000 + i + draw * 10**8 for i in range(n)],
                                       batch_size=batch_size)
            out[name] = float(world.classify(tokens)[concept].mean())
    return out


ROUTES = ("joint", "composed")  # a many-concept comparison's routes: one joint run, a job array's merged deltas
BASE_HITS_DIR = ".base-hits"  # in a world model's folder (hidden: a merge does not carry it): its hit rates per split and size


def base_hits_key(model_path: str, world: World, split: str, n: int, guidance_weight: float,
                  batch_size: int = 64) -> str:
    """What the base model's hit rates depend on: its weights (a digest of every weight file), the world
    (prompts and judge), the split, the prompts per group, the guidance, the sampling batch, the thread
    count and torch's version (float sums, and so a sample, may differ between them)."""
    import hashlib

    weights = hashlib.sha256()
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_path}: no *.safetensors weight file to key the base model's hit rates on")
    for f in files:
        weights.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                weights.update(chunk)
    text = json.dumps({"weights": weights.hexdigest(), "world": world.config_hash, "split": split, "n": n,
                       "guidance": guidance_weight, "batch": batch_size, "threads": torch.get_num_threads(),
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_base_hits(model_path: str, world: World, bundle, split: str, n: int, guidance_weight: float,
                     log: Callable[[str], None] = print) -> dict[str, float]:
    """``hit_rates`` of the unchanged base model, kept in ``<model_path>/.base-hits/<key>.json`` so later
    comparisons on the same model, split and size reuse it (on the large world it costs minutes). A model
    folder that cannot be written to is measured every time."""
    import os

    key = base_hits_key(model_path, world, split, n, guidance_weight)
    path = Path(model_path) / BASE_HITS_DIR / f"{key}.json"
    if path.is_file():
        saved = _saved_hits(path, key)
        if saved is not None:
            log(f"base hit rates: measured before on this model, split and size ({path})")
            return saved
        log(f"base hit rates: {path} is unreadable; measuring again")  # and rewritten below
    hits = hit_rates(world, bundle, split, n, guidance_weight)
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "split": split, "n": n, "guidance": guidance_weight,
                                   "hits": hits}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log(f"base hit rates: not kept ({e.strerror or e}: {path.parent}); the next comparison measures them again")
    return hits


def _saved_hits(path: Path, key: str) -> Optional[dict[str, float]]:
    """The hit rates kept in ``path`` under ``key``, or None when the file is damaged or holds another key."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("hits"), dict):
        return None
    return {k: float(v) for k, v in saved["hits"].items()}


def add_world_arguments(ap) -> None:
    """``--world-recipe`` and ``--world-set``: the world builds a harness script measures on."""
    ap.add_argument("--world-recipe", action="append", default=[], metavar="NAME",
                    help="a world recipe for the builds, e.g. world-large or world-large-mini (before --world-set)")
    ap.add_argument("--world-set", action="append", default=[], dest="world_overrides",
                    help="a world.* override for the builds (e.g. world.cache_dir=DIR, world.max_steps=600)")


def check_world_arguments(ap, args) -> None:
    """Refuse (``ap.error``) a ``--world-set`` that is not ``world.KEY=VALUE``, before any work starts."""
    bad = [w for w in args.world_overrides if not w.startswith("world.")]
    if bad:
        ap.error(f"--world-set: expected world.KEY=VALUE, got {bad}")


def world_config(args, world_seed: int):
    """The world config of one build: the recipes, then the overrides, then the seed."""
    from ear_dist.config import load_config

    return load_config(overrides=[*args.world_overrides, f"world.seed={world_seed}"], recipes=args.world_recipe).world


def judge_noise(world: World, bundle, split: str, n: int, guidance_weight: float, base_hits: dict[str, float],
                draws: int = 1) -> list[dict]:
    """The judge's own noise floor at this evaluation size: the unchanged model judged again with ``draws`` other
    sets of sampling seeds (the same prompts, ``hit_rates(draw=k)``), as preservation against ``base_hits`` over
    every group: the mean ratio and the worst group of each draw. A run's figures are only as exact as these."""
    out = []
    for k in range(1, draws + 1):
        again = hit_rates(world, bundle, split, n, guidance_weight, draw=k)
        p = figures.preservation(base_hits, again)
        out.append({"draw": k, "prompts_per_group": n, "mean": p.mean, "worst": p.worst,
                    "worst_group": p.worst_concept})
    return out


@dataclass
class Outcome:
    """One model against the base, for the concepts it erased (figures as ``ear_dist.eval.figures`` defines them)."""

    erased: list[str]
    erasure: dict[str, float]  # erased concept group -> 1 - hit rate
    preservation: dict[str, float]  # other concept group -> hit rate after / before (base above the floor)
    hits: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, dict] = field(default_factory=dict)  # groups whose base hit rate gives no ratio
    preservation_figures: Optional[figures.Preservation] = None
    erasure_figures: Optional[figures.Erasure] = None

    @property
    def erasure_min(self) -> float:
        """The worst erased group's erasure (what the bar judges)."""
        return self.erasure_figures.worst

    @property
    def preservation_mean(self) -> Optional[float]:
        """The preservation ratio: mean of the per-concept ratios."""
        return self.preservation_figures.mean

    @property
    def preservation_worst(self) -> tuple[Optional[str], Optional[float]]:
        return self.preservation_figures.worst_concept, self.preservation_figures.worst


def outcome(base_hits: dict[str, float], hits: dict[str, float], erased: Sequence[str],
            base_floor: float = figures.BASE_FLOOR, vocab: Optional[Vocabulary] = None) -> Outcome:
    """Erasure of the erased concepts' groups, preservation ratio of every other group (zero base: excluded)."""
    # every group of an erased concept, whatever the split (a generated world's validation and held-out words are
    # different groups): an erased concept's word is never scored as a kept concept
    erased_groups = {g for c in erased for split in SPLITS for g in concept_groups(c, split, vocab)}
    erased_hits = {g: v for g, v in hits.items() if g in erased_groups}
    # the concept's own test prompts are the canonical word's group, named as the concept
    gone = figures.erasure(erased_hits, test_groups=[c for c in erased if c in erased_hits])
    kept = figures.preservation(base_hits, {g: v for g, v in hits.items() if g not in erased_groups}, base_floor)
    return Outcome(list(erased), gone.groups, kept.ratios, hits, kept.excluded, kept, gone)


def training_pairs(world: World, base, concept: str, n_pairs: int, avoid: Sequence[str] = ()) -> list[PromptPair]:
    """ECG pairs of the training templates, kept by the visual filter (surrogate rollouts stored); ``avoid``: the
    other concepts of a many-concept job, which no pair shows (``make_pairs``)."""
    from ear_dist.world.erasure import make_pairs, visual_filter

    kept, _ = visual_filter(world, base, make_pairs(world, concept, n_pairs, avoid=avoid), concept,
                            guidance_weight=world.config.guidance_weight)
    if not kept:
        raise RunFailure(f"the visual filter kept no pair for {concept!r}: the world model does not draw it")
    return kept


@dataclass
class Method:
    """A named erasure method: config overrides on top of the world's erasure settings."""

    name: str
    overrides: list[str]
    anchors: int = 0  # anchor prompts of the other concepts (preserve.prompts) when > 0
    probes: int = 0  # probe prompts (preserve.probe_prompts) when > 0


def run_method(method: Method, model_path: str, world: World, pairs: dict[str, list[PromptPair]],
               concepts: Sequence[str], out_dir: Path, seed: int, base_overrides: Sequence[str],
               steps_factor: int = 1, progress: bool = False, extra: Sequence[str] = ()) -> tuple[str, float]:
    """Train ``method`` on the pairs of ``concepts`` (one run, joint when several); returns (delta, seconds per step, steps).

    ``extra``: overrides after the method's (the composed runs' ``slurm.concepts``)."""
    from ear_dist.config import load_config
    from ear_dist.train.trainer import run_erase
    from ear_dist.world.erasure import anchor_prompts

    # a comparison measures afresh: a previous run in out_dir is replaced, not resumed
    sets = ["train.resume=never", f"model.path={model_path}", f"train.out_dir={out_dir}", "model.device=cpu",
            f"erase.concept={concepts[0]}", f"train.seed={seed}", *base_overrides, *method.overrides, *extra]
    # anchors and probes go in as overrides (a JSON list is YAML), so the config is validated with them
    if method.anchors:
        anchors = anchor_prompts(world, concepts, method.anchors)
        sets.append(f"preserve.prompts={json.dumps(anchors)}")
    if method.probes:
        probes = anchor_prompts(world, concepts, method.probes, _PROBE_STREAM)
        sets += [f"preserve.probe_prompts={json.dumps(probes)}", "preserve.probe_every=10"]
    cfg = load_config(overrides=sets)
    cfg.train.steps *= steps_factor
    train_pairs = [PromptPair(**asdict(p)) for c in concepts for p in pairs[c]]
    summary = run_erase(cfg, train_pairs, progress=progress)
    return summary["delta"], summary["seconds"] / max(cfg.train.steps, 1), cfg.train.steps


def compare(model_path: str, world: World, methods: Sequence[Method], out_dir: Path, singles: Sequence[str],
            multi: Sequence[str], seeds: Sequence[int], split: str, n_pairs: int = 32, n_eval: int = 48,
            base_overrides: Sequence[str] = (), log: Callable[[str], None] = print, avoid_erased: bool = True,
            base_hits: Optional[dict[str, float]] = None, routes: Sequence[str] = ROUTES) -> dict:
    """Every method on every single concept, on ``multi`` jointly and composed, for each erasure seed.

    ``world`` is the world of the model's family (``world_for``); ``base_overrides`` select the
    family's erasure settings (``model.family=var`` for a VAR world model). ``avoid_erased``: the joint
    run's and the array tasks' pairs avoid the other concepts of ``multi`` (what ``ear-dist erase-many``
    does); False gives every run the single-concept pairs (the tables before the many-concept job).
    ``base_hits``: the base model's hit rates on this split and size from an earlier call (not measured again;
    else ``cached_base_hits``). ``routes``: which of the joint run and the composed array ``multi`` gets.
    """
    if not routes or any(r not in ROUTES for r in routes):
        raise InputError(f"routes: {list(routes)}; each of {', '.join(ROUTES)}, at least one")
    from ear_dist.models.delta import apply_deltas
    from ear_dist.models.family import detect_family, load_model

    out_dir = Path(out_dir)
    g = world.config.guidance_weight
    family = detect_family(model_path) or "janus"
    if world.family != family:
        raise InputError(f"{model_path}: a {family} model cannot be judged on a {world.family} world "
                         "(world_for(config, family) gives the family's world)")
    from ear_dist.world.pretrain import model_build_info, refuse_missed_target

    refuse_missed_target(model_build_info(model_path), world.config, f"the comparison ({model_path})", log)
    base = load_model(model_path, family, device="cpu", dtype="float32")
    if base_hits is None:
        base_hits = cached_base_hits(model_path, world, base, split, n_eval, g, log)
    log(f"base: {json.dumps({k: round(v, 3) for k, v in base_hits.items()})}")
    every = list(dict.fromkeys(list(singles) + list(multi)))
    pairs = {c: training_pairs(world, base, c, n_pairs) for c in every}
    # the joint run and the array tasks know the job's other concepts: their pairs avoid them
    multi_pairs = {c: training_pairs(world, base, c, n_pairs, avoid=multi) for c in multi} if avoid_erased else pairs
    results: dict = {"base": base_hits, "split": split, "runs": []}

    def judge(deltas: list[str]) -> dict[str, float]:
        bundle = load_model(model_path, family, device="cpu", dtype="float32")
        apply_deltas(bundle.model, deltas)
        return hit_rates(world, bundle, split, n_eval, g)

    for method in methods:
        # a job array's task knows the array's concepts (slurm.concepts); only surrogate anchors read them
        array = [f"slurm.concepts={json.dumps(list(multi))}"] if _uses_surrogates(method.overrides) else []
        for seed in seeds:
            singles_done: dict[str, str] = {}
            single_cost: dict[str, dict] = {}
            for concept in every:
                if concept not in singles and (array or "composed" not in routes):
                    continue  # trained below, as an array task, or not composed at all
                run_dir = out_dir / "runs" / _slug(method.name) / f"seed{seed}" / _slug(concept)
                started = time.perf_counter()
                singles_done[concept], step_s, steps = run_method(method, model_path, world, pairs, [concept], run_dir,
                                                           seed, base_overrides)
                single_cost[concept] = _cost(time.perf_counter() - started, steps)
                results.setdefault("step_seconds", {}).setdefault(method.name, []).append(step_s)
            settings = [(c, [c], [singles_done[c]]) for c in singles]
            cost = {c: single_cost[c] for c in singles}
            if len(multi) > 1 and "joint" in routes:
                joint_dir = out_dir / "runs" / _slug(method.name) / f"seed{seed}" / "joint"
                started = time.perf_counter()
                joint, _, steps = run_method(method, model_path, world, multi_pairs, list(multi), joint_dir, seed,
                                             base_overrides, steps_factor=len(multi))
                cost["joint: " + ", ".join(multi)] = _cost(time.perf_counter() - started, steps)
                settings.append(("joint: " + ", ".join(multi), list(multi), [joint]))
            if len(multi) > 1 and "composed" in routes:
                if not array:
                    composed = [singles_done[c] for c in multi]
                    seconds = sum(single_cost[c]["seconds"] for c in multi)
                    steps = sum(single_cost[c]["steps"] for c in multi)
                else:
                    composed, seconds, steps = [], 0.0, 0
                    for c in multi:
                        started = time.perf_counter()
                        delta, _, one_steps = run_method(method, model_path, world, multi_pairs, [c], out_dir / "runs" /
                                                   _slug(method.name) / f"seed{seed}" / "array" / _slug(c), seed,
                                                   base_overrides, extra=array)
                        one = _cost(time.perf_counter() - started, one_steps)
                        composed.append(delta)
                        seconds, steps = seconds + one["seconds"], steps + one["steps"]
                cost["composed: " + ", ".join(multi)] = {"seconds": round(seconds, 1), "steps": steps}
                settings.append(("composed: " + ", ".join(multi), list(multi), composed))
            for setting, erased, deltas in settings:
                res = outcome(base_hits, judge(deltas), erased, vocab=world.vocab)
                results["runs"].append({"method": method.name, "seed": seed, "setting": setting,
                                        "erased": erased, "erasure": res.erasure, "preservation": res.preservation,
                                        "preservation_excluded": res.excluded, "hits": res.hits,
                                        "train": cost.get(setting)})
                log(f"{method.name} | seed {seed} | {setting}: {figures_line(res)}")
    return results


def _cost(seconds: float, steps: int) -> dict:
    """A run's wall time (training with its set-up: teacher, anchors, projectors) and its optimizer steps."""
    return {"seconds": round(seconds, 1), "steps": int(steps)}


def _uses_surrogates(overrides: Sequence[str]) -> bool:
    """Whether the last ``preserve.surrogates`` among ``overrides`` turns surrogate anchors on."""
    values = [o.split("=", 1)[1].strip() for o in overrides if o.startswith("preserve.surrogates=")]
    return bool(values) and values[-1] not in ("0", "")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def figures_line(res: Outcome) -> str:
    """One run's figures in words: worst erased group, preservation ratio, worst concept, excluded groups."""
    p = res.preservation_figures
    kept = "no ratio (every base hit rate at the floor)" if p.mean is None else (
        f"preservation ratio (mean of ratios) {p.mean:.3f}, worst {p.worst:.3f} ({p.worst_concept})")
    out = f"erasure, worst group {res.erasure_min:.3f} ({res.erasure_figures.worst_group}), {kept}"
    return out + (f"; excluded (base hit rate <= {p.base_floor}): {', '.join(p.excluded)}" if p.excluded else "")


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Per (method, setting), mean, min and max over builds and seeds of erasure and preservation.

    Each run's figures are ``figures.preservation`` of its stored per-concept ratios (excluded groups
    are not in them); the bar is ``figures.meets_bar`` of each run."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    rows = []
    for (method, setting), rs in groups.items():
        gone = [figures.erasure({g: 1.0 - e for g, e in r["erasure"].items()}) for r in rs]
        kept = [figures.preservation({g: 1.0 for g in r["preservation"]}, r["preservation"]) for r in rs]
        scored = [k for k in kept if k.mean is not None]
        excluded = sorted({g for r in rs for g in r.get("preservation_excluded", {})})
        rows.append({"method": method, "setting": setting, "runs": len(rs),
                     "erasure": _spread([e.worst for e in gone]),
                     "preservation_mean": _spread([k.mean for k in scored]) if scored else None,
                     "preservation_worst": _spread([k.worst for k in scored]) if scored else None,
                     "worst_concept": statistics.mode([k.worst_concept for k in scored]) if scored else None,
                     "excluded": excluded,
                     "meets_bar": all(figures.meets_bar(e, k) for e, k in zip(gone, kept))})
    return rows


def _spread(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
            "std": float(np.std(values))}


def markdown(rows: Sequence[dict]) -> str:
    """The comparison table: erasure (worst erased group), preservation ratio (mean of ratios) and worst concept."""
    def cell(s):
        return "-" if s is None else f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    lines = ["| method | setting | runs | erasure, worst group: mean (min-max) | preservation ratio (mean of "
             "per-concept ratios) | worst concept's ratio | most often worst | excluded (base hit rate 0) | bar met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['runs']} | {cell(r['erasure'])} | "
                     f"{cell(r['preservation_mean'])} | {cell(r['preservation_worst'])} | "
                     f"{r['worst_concept'] or '-'} | "
                     f"{', '.join(r['excluded']) or '-'} | {'yes' if r['meets_bar'] else 'no'} |")
    return "\n".join(lines)


def base_table(bases: dict[int, dict]) -> str:
    """The base models' own hit rates, one row per world build."""
    names = list(next(iter(bases.values())))
    lines = ["| world seed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for seed, hits in bases.items():
        lines.append(f"| {seed} | " + " | ".join(f"{hits[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def write(out_dir: Path, results_by_world: dict[int, dict], info: Optional[dict] = None) -> dict:
    """results.json and results.md for a comparison over one or more world builds."""
    runs = [dict(r, world_seed=ws) for ws, res in results_by_world.items() for r in res["runs"]]
    rows = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"info": info or {}, "summary": rows, "runs": runs,
               "base": {ws: res["base"] for ws, res in results_by_world.items()},
               "step_seconds": {ws: res.get("step_seconds", {}) for ws, res in results_by_world.items()}}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    text = markdown(rows) + "\n\nBase model hit rates:\n\n" + base_table(payload["base"]) + "\n"
    (out_dir / "results.md").write_text(text)
    return payload
