"""Erasure measured on the planted-concept world: ECG pairs, VF, the real ``run_erase``, held-out evaluation.

The pairs come from the TRAINING templates with the canonical word only ("church");
evaluation is ``ear-dist eval``'s world suite (``ear_dist.world.suite``): HELD-OUT
sentence templates and the synonyms ("chapel", "cathedral"), none of which appear in a
training pair. Images are the model's own CFG samples, judged by the world's calibrated
classifier.

- erasure rate = 1 - Acc., the share of the concept's own held-out test prompts (canonical
  word) whose image still shows the concept; the synonyms' share beside it, and the
  least-erased group named;
- preservation ratio = the mean over the other objects (or styles) of their hit rate after /
  before, with the worst concept named, plus the total-variation distance between the code
  histograms of images for unrelated prompts before and after.

Every figure is defined once, in ``ear_dist/eval/figures.py``.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ear_dist.config.loading import recipe_overrides
from ear_dist.data.pairs import PromptPair
from ear_dist.errors import InputError, RunFailure
from ear_dist.eval import figures
from ear_dist.models.family import as_image_model, detect_family, load_model
from ear_dist.models.interface import ImageModel
from ear_dist.world.world import World
from ear_dist.world.concepts import all_concept_words, concept_words

PAIR_STREAM, ANCHOR_STREAM = 202, 303

# The world's erasure settings and the project's methods are shipped recipes (ear_dist/config/recipes,
# docs/recipes.md); the demo and the research harness compose them as override lists.
WORLD_ERASE = recipe_overrides("world-ear")  # the world's 4-layer, 64-token model
# the project's preserving method on the Janus world: what the demo shows beside the paper's EAR
PRESERVING = recipe_overrides("preserving")

# The methods tried before it, kept for the comparisons (results/preservation-selection.md):
# the first preserving method: targets anchored on the unconditional branch from the target prompt's own rollouts
# (logit KL), preservation KL on anchor prompts of the other concepts, null-space projected updates, eta 3, 100 steps.
UNCOND_ANCHORED_PRESERVING = ["erase.reference_prompt=unconditional", "erase.rollout_from=target",
                              "erase.target_mode=logit", "preserve.weight=1.0", "preserve.nullspace=true",
                              "erase.erase_guidance=3", "train.steps=100"]
PRESERVE_ANCHORS, PRESERVE_ANCHOR_STREAM = 64, 43_000

# Null-space EAR: the var world's preserving method (every layer, 99.99% of the anchors' input energy) with the
# anchors' KL at weight 1 (the var blocks read the text through cross-attention and keep weight 3).
NULLSPACE_EAR = [*recipe_overrides("preserving-var"), "preserve.weight=1.0"]
# Later-layer null-space EAR: the same with the first layer frozen, the wider room (99.9%), lr 1.5e-3 and the anchors'
# KL at weight 3; the preserving method is this with the pairs' own surrogates among the anchors.
NULLSPACE_EAR_LATER = [*NULLSPACE_EAR, "trainable.skip_first_layers=1", "preserve.nullspace_energy=0.999",
                       "optim.lr=1.5e-3", "preserve.weight=3.0"]


def anchor_prompts(world: World, erased: Sequence[str], n: int, stream: int = PRESERVE_ANCHOR_STREAM) -> list[str]:
    """Training-template prompts of the concepts not erased (anchors and probes: never evaluation prompts)."""
    objects = [o for o in world.vocab.objects if o not in erased]
    styles = [None] + [s for s in world.vocab.styles if s not in erased]
    return world.sample(n, "train", stream=stream, objects=objects, styles=styles).prompts


def with_anchor_prompts(world: World, erased: Sequence[str], sets: Sequence[str], n: int = PRESERVE_ANCHORS
                        ) -> list[str]:
    """``sets`` plus ``preserve.prompts`` (other concepts' training prompts) when they turn on
    preservation or null-space updates and name no anchors of their own; plus ``erase.adversarial.exclude`` (every
    word of the erased concepts) when they turn on adversarial erasure and name no words of their own."""
    def value(key):
        found = [x.split("=", 1)[1].strip().lower() for x in sets if x.split("=", 1)[0].strip() == key]
        return found[-1] if found else ""

    weight = value("preserve.weight")
    wants = value("preserve.nullspace") == "true" or (weight != "" and float(weight) > 0)
    sets = list(sets)
    every = value("erase.adversarial.every")
    if every not in ("", "0") and not value("erase.adversarial.exclude"):
        # the adversarial search never proposes an erased concept's words (its held-out ones are evaluation's)
        sets.append(f"erase.adversarial.exclude={json.dumps(all_concept_words(world, erased))}")
    if not wants or value("preserve.prompts") or value("preserve.prompts_file"):
        return sets
    return [*sets, f"preserve.prompts={json.dumps(anchor_prompts(world, erased, n))}"]


VAR_WORLD_ERASE = recipe_overrides("world-var-ear")
# S-VARE on the var world: the paper's modules (recipe svare-var) and the world's wrong-bit share (recipe world-var-svare)
SVARE_WORLD_BIT_SHARE = "erase.svare_bit_error_share=0.08"


def _unknown_concept(world: World, concept: str) -> ValueError:
    return ValueError(f"concept {concept!r}: the world's concepts are {', '.join(world.vocab.concepts)}")


def make_pairs(world: World, concept: str, n: int, stream: int = PAIR_STREAM, avoid: Sequence[str] = ()
               ) -> list[PromptPair]:
    """ECG from templates: training-template prompts with the concept and their surrogates.

    An object concept is replaced by another object (church -> barn, castle, ...); a
    style concept is removed (the same sentence without "in the style of ..."). Targets use
    the concept's train words only (the planted world: the canonical word; a generated world:
    the canonical word and one synonym), never a validation or held-out word.

    ``avoid``: the other concepts a many-concept job erases. Neither side of a pair then shows
    one of them: a surrogate object is drawn from the objects not avoided, a sentence's style
    (an object's pair) or object (a style's pair) from those not avoided, so no pair teaches the
    student to draw what another pair of the same job removes (church -> barn while barn is
    erased too). Empty: the single-concept pairs, as before.
    """
    vocab = world.vocab
    words = concept_words(world, concept, "train") if concept in vocab.concepts else ()
    avoid = [a for a in avoid if a != concept]
    # In a many-concept job every concept draws its own sentences, styles, surrogates and rollout seeds: with
    # one stream for all, pair i of every concept was the same sentence with the same surrogate (church ->
    # barn, castle -> barn, ...), so a joint run of N concepts taught N words one set of 32 images.
    seed_offset = concept_offset(concept) if avoid else 0
    stream += seed_offset
    rng = np.random.default_rng([world.seed, stream])
    unknown = [a for a in avoid if a not in vocab.concepts]
    if unknown:
        raise _unknown_concept(world, unknown[0])
    kept_objects = [o for o in vocab.objects if o not in avoid]
    restrict: dict = {}
    if concept in vocab.objects:
        if avoid:  # a kept style or none; the plain draw otherwise (the single-concept pairs, unchanged)
            restrict["styles"] = [None, *(s for s in vocab.styles if s not in avoid)]
        batch = world.sample(n, split="train", stream=stream, objects=[concept], object_words=list(words), **restrict)
        others = [o for o in kept_objects if o != concept]
        if not others:
            raise InputError(f"concept {concept!r}: no object is left to be its surrogate when "
                             f"{', '.join(avoid)} are erased too")
        pairs = [(r, r.replace(vocab, object=others[int(rng.integers(len(others)))])) for r in batch.records]
    elif concept in vocab.styles:
        if avoid:
            if not kept_objects:
                raise InputError(f"concept {concept!r}: every object is erased too, so no sentence is left to "
                                 "carry the style")
            restrict["objects"] = kept_objects
        batch = world.sample(n, split="train", stream=stream, styles=[concept], **restrict)
        pairs = [(r, r.replace(vocab, style=None)) for r in batch.records]
    else:
        raise _unknown_concept(world, concept)

    def named(record) -> str:  # the concept as the target prompt writes it
        if concept in vocab.objects:
            return record.object_word
        return vocab.style_phrase(concept, record.style_word).lower()

    return [PromptPair(t.prompt, s.prompt, concept=named(t) if named(t) in t.prompt.lower() else concept,
                       surrogate_concept=s.object if concept in vocab.objects else "", source="world-ecg",
                       seed=seed_offset + i)
            for i, (t, s) in enumerate(pairs)]


def concept_offset(concept: str) -> int:
    """A stable per-concept offset (a multiple of 2**16 below 2**31) for the streams and seeds of a
    many-concept job's pairs, the same in every process and for any job the concept is part of."""
    return (zlib.crc32(concept.encode()) & 0x7FFF) << 16


def make_anchor_pairs(world: World, concept: str, n: int, stream: int = ANCHOR_STREAM) -> list[PromptPair]:
    """Preservation anchors: training-template prompts of the OTHER concepts, each its own surrogate.

    For an object concept they show the other objects (any scene, any style); for a style,
    prompts without it. Training on them pulls the student back to the teacher on those
    prompts wherever it drifted by more than the loss threshold.
    """
    if n <= 0:
        return []
    vocab = world.vocab
    if concept in vocab.objects:
        batch = world.sample(n, split="train", stream=stream, objects=[o for o in vocab.objects if o != concept])
    elif concept in vocab.styles:
        batch = world.sample(n, split="train", stream=stream,
                             styles=[None, *(s for s in vocab.styles if s != concept)])
    else:
        raise _unknown_concept(world, concept)
    return [PromptPair(r.prompt, r.prompt, concept=concept, source="world-anchor", seed=100000 + i)
            for i, r in enumerate(batch.records)]


def interleave(pairs: Sequence[PromptPair], anchors: Sequence[PromptPair]) -> list[PromptPair]:
    """Erasure pairs and anchors alternating (the rest of the longer list at the end)."""
    out: list[PromptPair] = []
    for i in range(max(len(pairs), len(anchors))):
        out += [p[i] for p in (pairs, anchors) if i < len(p)]
    return out


@dataclass
class FilterReport:
    kept: int = 0
    dropped_target_without_concept: int = 0
    dropped_surrogate_with_concept: int = 0


def visual_filter(world: World, bundle: ImageModel, pairs: Sequence[PromptPair], concept: str,
                  guidance_weight: float = 5.0, batch_size: int = 32) -> tuple[list[PromptPair], FilterReport]:
    """Keep pairs whose target image shows the concept and whose surrogate image does not.

    The teacher samples both prompts with the pair's seed; the surrogate tokens are
    stored on the kept pairs so training reuses them.
    """
    seeds = [p.seed for p in pairs]
    bundle = as_image_model(bundle)
    t_tok = bundle.sample([p.target for p in pairs], guidance_weight=guidance_weight, seeds=seeds, batch_size=batch_size)
    s_tok = bundle.sample([p.surrogate for p in pairs], guidance_weight=guidance_weight, seeds=seeds,
                          batch_size=batch_size)
    t_has = world.classify(t_tok)[concept]
    s_has = world.classify(s_tok)[concept]
    report, kept = FilterReport(), []
    for i, p in enumerate(pairs):
        if not t_has[i]:
            report.dropped_target_without_concept += 1
        elif s_has[i]:
            report.dropped_surrogate_with_concept += 1
        else:
            p.surrogate_tokens = s_tok[i].tolist()
            kept.append(p)
            report.kept += 1
    return kept, report


@dataclass
class Evaluation:
    concept: str
    concept_share: dict = field(default_factory=dict)  # group -> share of images showing the concept
    preservation: dict = field(default_factory=dict)  # other concept -> hit rate on its own prompts
    token_tv_distance: Optional[float] = None  # unrelated prompts, vs the reference histogram
    test_groups: list = field(default_factory=list)  # the concept's own test prompts (empty: every group)

    @property
    def erasure(self) -> figures.Erasure:
        return figures.erasure(self.concept_share, test_groups=self.test_groups or None)

    @property
    def erasure_rate(self) -> float:
        """1 - Acc.: the share still showing the concept on its own held-out test prompts."""
        return self.erasure.rate

    @property
    def erasure_all_groups(self) -> float:
        """1 - the hit rate over every held-out concept group, sentences and synonyms alike (groups of equal size:
        their plain mean); what the demo called its erasure rate before Acc. was the test prompts' alone."""
        return 1.0 - figures.accuracy(self.concept_share)

    @property
    def synonym_share(self) -> Optional[float]:
        return figures.accuracy(self.concept_share, groups=[g for g in self.concept_share if g not in self.test_groups]
                                ) if self.test_groups else None

    @property
    def preservation_hit_rate(self) -> float:
        """Mean hit rate of the other concepts (what the preservation ratios divide; not a ratio)."""
        return float(np.mean(list(self.preservation.values())))

    def preservation_vs(self, before: "Evaluation") -> figures.Preservation:
        return figures.preservation(before.preservation, self.preservation)


def evaluate_world(model_path: str, world: World, concepts: Sequence[str], columns: Sequence, out_dir: Path,
                   n_eval: int = 48, overrides: Sequence[str] = (), progress: bool = False,
                   log=print) -> tuple[dict[str, dict[str, Evaluation]], dict]:
    """``ear-dist eval`` with the world suite of each concept: -> ({column: {concept: Evaluation}}, report).

    ``columns`` are delta files (``NAME=PATH``) or ``Column``s; "before" is the base model.
    ``overrides`` are the run's ``--set`` values (sampling settings apply to both).
    """
    from ear_dist.config import load_config
    from ear_dist.eval.evaluate import BASE, run_eval
    from ear_dist.world.suite import world_suite

    family = detect_family(model_path) or "janus"
    cfg = load_config(overrides=[*overrides, f"model.path={model_path}", f"model.family={family}",
                                 "model.device=cpu", f"eval.world_prompts={n_eval}"])
    cfg.world = world.config
    suites = [world_suite(cfg, c, world) for c in concepts]
    report = run_eval(cfg, suites, list(columns), out_dir, progress=progress, log=log)
    rows: dict[str, dict[str, Evaluation]] = {}
    for column in report["columns"]:
        name = "before" if column["name"] == BASE else column["name"]
        rows[name] = {c: evaluation_from_report(report, column["name"], s.name, c) for c, s in zip(concepts, suites)}
    return rows, report


def evaluation_from_report(report: dict, column: str, suite: str, concept: str) -> Evaluation:
    """One column's world-suite results as an ``Evaluation`` (concept groups, preservation, token TV)."""
    res = report["results"][column][suite]
    groups = report["suites"][suite]["groups"]
    return Evaluation(
        concept,
        concept_share={g: res["groups"][g] for g, info in groups.items() if info["role"] == "concept"},
        preservation={g: res["groups"][g] for g, info in groups.items() if info["role"] == "preservation"},
        token_tv_distance=res.get("token_tv"),
        test_groups=[g for g, info in groups.items() if info["role"] == "concept" and info.get("kind") == "test"],
    )


def bar_report(rows: dict[str, Evaluation], bar: float = figures.BAR) -> str:
    """Per erased model: the bar of ``figures.meets_bar`` (worst erased group, preservation ratio = mean of the
    per-concept ratios, worst concept, all >= ``bar``), each figure named."""
    before = rows["before"]
    lines = []
    for name, ev in rows.items():
        if name == "before":
            continue
        gone, kept = ev.erasure, ev.preservation_vs(before)
        ratio = "no ratio" if kept.mean is None else f"{kept.mean:.3f}, worst {kept.worst_concept} {kept.worst:.3f}"
        excluded = f" (excluded, base hit rate 0: {', '.join(kept.excluded)})" if kept.excluded else ""
        undrawn = figures.unmeasured(before.erasure)
        undrawn = f" (not measurable: the base model never draws {', '.join(undrawn)})" if undrawn else ""
        lines.append(f"{name}: erasure rate {gone.rate:.3f}, least-erased group {gone.worst_group} {gone.worst:.3f}"
                     f"{undrawn}, preservation ratio {ratio}{excluded} -> the bar (all >= {bar}) is "
                     f"{'met' if figures.meets_bar(gone, kept, bar, base=before.erasure) else 'NOT met'}")
    return "\n".join(lines)


def markdown_table(rows: dict[str, Evaluation], baseline: str = "before") -> str:
    """One row per model: erasure rate (1 - Acc.), per-group concept share, least-erased group, preservation ratio
    (mean of per-concept ratios against ``baseline``) and worst concept, mean preservation hit rate, token TV."""
    first = next(iter(rows.values()))
    groups = list(first.concept_share)
    head = ["model", "erasure rate (1 - Acc.)"] + [f"still {first.concept}: {g}" for g in groups] + \
        ["least-erased group", "preservation ratio (mean of ratios)", "worst concept", "preservation hit rate (mean)",
         "token TV distance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ev in rows.items():
        gone = ev.erasure
        kept = ev.preservation_vs(rows[baseline]) if name != baseline and baseline in rows else None
        ratio = "-" if kept is None or kept.mean is None else f"{kept.mean:.3f}"
        worst = "-" if kept is None or kept.worst is None else f"{kept.worst_concept} {kept.worst:.3f}"
        cells = [name, f"{gone.rate:.3f}"] + [f"{ev.concept_share[g]:.3f}" for g in groups] + \
            [f"{gone.worst_group} {gone.worst:.3f}", ratio, worst, f"{ev.preservation_hit_rate:.3f}",
             "-" if ev.token_tv_distance is None else f"{ev.token_tv_distance:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def to_json(rows: dict[str, Evaluation]) -> dict:
    before = rows.get("before")

    def kept(v: Evaluation) -> Optional[dict]:
        return None if before is None or v is before else v.preservation_vs(before).to_dict()

    return {k: {**asdict(v), "erasure": v.erasure.to_dict(), "erasure_rate": v.erasure_rate,
                "preservation_hit_rate": v.preservation_hit_rate, "preservation_ratio": kept(v)}
            for k, v in rows.items()}


def write_report(out_dir: Path, rows: dict[str, Evaluation], extra: dict) -> None:
    """results.json and results.md (the eval report beside them holds the images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"results": to_json(rows), **extra}, indent=2))
    (out_dir / "results.md").write_text(markdown_table(rows) + "\n")


# The paper's ablations, as config overrides on top of the run's settings.
ABLATIONS: dict[str, list[str]] = {
    "EAR": [],
    "TLM off": ["erase.loss_threshold=0"],
    "window 1": ["erase.window_len=1"],
    "random order": ["erase.window_order=random"],
    "per-sequence updates": ["erase.update_mode=sequence"],
    "cached prefix": ["erase.window_prefix=cached"],
    "logit targets": ["erase.target_mode=logit"],
    "S-VARE": recipe_overrides("svare"),
    "ESD-style naive": recipe_overrides("esd"),
    "preserving": PRESERVING,
    "uncond-anchored preserving": UNCOND_ANCHORED_PRESERVING,
    "null-space EAR": NULLSPACE_EAR,
    "later-layer null-space EAR": NULLSPACE_EAR_LATER,
}


VAR_ABLATIONS: dict[str, list[str]] = {
    "EAR": [],
    "TLM off": ["erase.loss_threshold=0"],
    "two scales per window": ["erase.window_scales=2"],
    "random order": ["erase.window_order=random"],
    "per-sequence updates": ["erase.update_mode=sequence"],
    "logit targets": ["erase.target_mode=logit"],
    "S-VARE": [*recipe_overrides("svare-var"), SVARE_WORLD_BIT_SHARE],
    "ESD-style naive": recipe_overrides("esd"),
    "preserving": recipe_overrides("preserving-var"),
}


def run_world_erasure(model_path: str, world: World, out_dir: Path, concept: str = "church",
                      ablations: Sequence[str] = ("EAR",), n_pairs: int = 32, n_eval: int = 48,
                      overrides: Sequence[str] = (), progress: bool = True, log=print, n_anchors: int = 0,
                      table: Optional[dict] = None) -> dict:
    """ECG -> VF -> ``run_erase`` per ablation -> held-out evaluation -> report. Returns the rows.

    ``n_anchors`` preservation anchors (``make_anchor_pairs``) join the EAR-method runs'
    pairs; S-VARE and the ESD-style baseline train on the erasure pairs alone. ``table``:
    ablation name -> overrides (default ``ABLATIONS``). A Janus world model is evaluated
    through ``ear-dist eval``'s world suite, whatever its family.
    """
    table = ABLATIONS if table is None else table
    from ear_dist.config import load_config
    from ear_dist.train.trainer import run_erase

    out_dir = Path(out_dir)
    family = detect_family(model_path) or "janus"
    base = load_model(model_path, family, device="cpu", dtype="float32")
    pairs = make_pairs(world, concept, n_pairs)
    kept, vf = visual_filter(world, base, pairs, concept)
    log(f"ECG: {len(pairs)} template pairs; VF kept {vf.kept} (target without {concept}: "
        f"{vf.dropped_target_without_concept}, surrogate with {concept}: {vf.dropped_surrogate_with_concept})")
    if not kept:
        raise RunFailure(f"the visual filter kept no pair for {concept!r}: the world model does not draw it "
                         "(build it to the target accuracy: ear-dist world build)")
    anchors = make_anchor_pairs(world, concept, n_anchors)
    if anchors:
        log(f"preservation anchors: {len(anchors)} prompts of the other concepts")
    summaries, deltas = {}, []
    for name in ablations:
        if name not in table:
            raise InputError(f"ablation {name!r}: expected one of {', '.join(table)}")
    for name in ablations:
        run_dir = out_dir / "runs" / name.replace(" ", "-").lower()
        # each call measures afresh (the world model may have been rebuilt): replace, do not resume
        sets = ["train.resume=never", f"model.path={model_path}", f"model.family={family}", f"train.out_dir={run_dir}",
                f"erase.concept={concept}", "model.device=cpu", "train.tensorboard=true", *overrides, *table[name]]
        cfg = load_config(overrides=with_anchor_prompts(world, [concept], sets))
        train_pairs = [PromptPair(**asdict(p)) for p in kept]
        if cfg.erase.method == "ear":
            train_pairs = interleave(train_pairs, anchors)
        summary = run_erase(cfg, train_pairs, progress=progress)
        summaries[name] = {k: summary[k] for k in ("delta", "optimizer_steps", "windows_kept", "windows_total",
                                                   "seconds")}
        deltas.append(f"{name}={summary['delta']}")
        log(f"{name}: trained in {summary['seconds']:.0f} s")
    # the evaluation is ear-dist eval's world suite, one column per ablation
    table, report = evaluate_world(model_path, world, [concept], deltas, out_dir, n_eval, overrides, log=log)
    rows = {name: by_concept[concept] for name, by_concept in table.items()}
    for name, ev in rows.items():
        tv = "-" if ev.token_tv_distance is None else f"{ev.token_tv_distance:.3f}"
        log(f"{name}: erasure rate {ev.erasure_rate:.3f}, preservation hit rate {ev.preservation_hit_rate:.3f}, "
            f"token TV {tv}")
    grid = out_dir / report["grids"][f"world-{concept.replace(' ', '-')}"]
    shutil.copyfile(grid, out_dir / "before_after.png")
    write_report(out_dir, rows, {
        "concept": concept, "pairs": len(pairs), "anchors": len(anchors), "vf": asdict(vf), "runs": summaries,
        "model": model_path, "world": world.describe(), "overrides": list(overrides),
        "eval_report": str(out_dir / "report.json")})
    log(f"report: {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'report.md'}, "
        f"images: {out_dir / 'before_after.png'}")
    return rows


def run_joint_vs_composed(model_path: str, world: World, out_dir: Path, concepts: Sequence[str], n_pairs: int = 32,
                          n_eval: int = 48, overrides: Sequence[str] = (), progress: bool = False, log=print,
                          compose: Sequence[str] = ("sum",), joint: bool = True, energy: float = 0.999,
                          kept_anchors: int = PRESERVE_ANCHORS) -> dict:
    """Several concepts erased two ways, each concept evaluated on both models (its preservation ratio over the
    concepts none of ``concepts`` is).

    composed: one run per concept (as a Slurm job array would), deltas composed onto the base
    in memory by ``ear-dist eval``, one column per method of ``compose`` ("composed" sums them,
    "composed-project" and "composed-ties" are ``ear_dist.models.compose``'s, "project:0.9" with energy 0.9,
    "ties:0.5" with density 0.5; project reads each
    concept's training targets and ``kept_anchors`` training prompts of the other concepts); joint:
    one run on all concepts' pairs (each pair carries its concept), with as many steps as the
    per-concept runs together (``joint=False``: not trained).
    """
    from ear_dist.config import load_config
    from ear_dist.train.trainer import run_erase

    out_dir = Path(out_dir)
    family = detect_family(model_path) or "janus"
    base = load_model(model_path, family, device="cpu", dtype="float32")
    pairs = {}
    for c in concepts:
        kept, vf = visual_filter(world, base, make_pairs(world, c, n_pairs), c)
        if not kept:
            raise RunFailure(f"the visual filter kept no pair for {c!r}")
        pairs[c] = kept
        log(f"{c}: VF kept {vf.kept} of {n_pairs}")

    def cfg_for(name, erased, steps_factor=1):
        sets = ["train.resume=never", f"model.path={model_path}", f"model.family={family}",
                f"train.out_dir={out_dir / 'runs' / name}", "model.device=cpu", f"erase.concept={erased[0]}", *overrides]
        cfg = load_config(overrides=with_anchor_prompts(world, erased, sets))
        cfg.train.steps *= steps_factor
        return cfg

    deltas = []
    for c in concepts:
        cfg = cfg_for(c.replace(" ", "-"), [c])
        deltas.append(run_erase(cfg, [PromptPair(**asdict(p)) for p in pairs[c]], progress=progress)["delta"])
    # ear-dist eval's world suite, "before" included; the composed columns compose the deltas in memory
    from ear_dist.eval.generate import Column
    from ear_dist.models.compose import ComposeSpec

    guidance = load_config(overrides=list(overrides)).rollout.guidance_weight
    kept = tuple(anchor_prompts(world, concepts, kept_anchors)) if kept_anchors else ()
    columns = []
    for item in compose:  # "project", "project:0.9" (its energy), "project-kept" (off the kept prompts only),
        # "project-pooled" (the pooled subspace), "ties:0.5" (its density)
        method, _, share = item.partition(":")
        projects = method.startswith("project")
        spec = None if method == "sum" else ComposeSpec(
            "project" if projects else method, tuple(tuple(dict.fromkeys(p.target for p in pairs[c])) for c in concepts),
            kept, float(share) if share and projects else energy, guidance,
            float(share) if share and method == "ties" else ComposeSpec.density, other_concepts="kept" not in method,
            subspace="pooled" if "pooled" in method else "union")
        columns.append(Column("composed" if item == "sum" else f"composed-{item.replace(':', '-')}", tuple(deltas),
                              spec))
    if joint:
        joint_pairs = [PromptPair(**asdict(p)) for c in concepts for p in pairs[c]]
        delta = run_erase(cfg_for("joint", list(concepts), len(concepts)), joint_pairs, progress=progress)["delta"]
        columns.append(Column("joint", (delta,)))
    evaluations, _ = evaluate_world(model_path, world, concepts, columns, out_dir / "eval", n_eval, overrides, log=log)
    table: dict = {}
    for name, by_concept in evaluations.items():
        table[name] = {}
        for c, ev in by_concept.items():
            # the other erased concepts are meant to go: preservation is over the concepts no run erased
            others = {k: v for k, v in ev.preservation.items() if k not in concepts}
            kept = figures.preservation(evaluations["before"][c].preservation, others)
            table[name][c] = {"erasure_rate": ev.erasure_rate, "preservation_ratio": kept.mean,
                              "worst_concept": kept.worst_concept, "worst_ratio": kept.worst,
                              "excluded": list(kept.excluded), "preservation_hit_rate": ev.preservation_hit_rate}
        log(f"{name}: " + ", ".join(f"{c} erasure {v['erasure_rate']:.3f} / preservation ratio "
                                    f"{_num(v['preservation_ratio'])}, worst {v['worst_concept']} "
                                    f"{_num(v['worst_ratio'])}" for c, v in table[name].items()))
    lines = ["| model | " + " | ".join(f"{c}: erasure rate (1 - Acc.) | {c}: preservation ratio (mean of ratios) | "
                                      f"{c}: worst concept" for c in concepts) + " |",
             "|---|" + "---|---|---|" * len(concepts)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c]['erasure_rate']:.3f} | {_num(row[c]['preservation_ratio'])} | "
            f"{row[c]['worst_concept'] or '-'} {_num(row[c]['worst_ratio'])}" for c in concepts) + " |")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "multi_concept.md").write_text("\n".join(lines) + "\n")
    (out_dir / "multi_concept.json").write_text(json.dumps({"concepts": list(concepts), "results": table}, indent=2))
    return table
