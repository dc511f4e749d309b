"""The many-concept job: pairs -> filter -> train -> (array: merge) -> eval -> one report.

Each stage writes its outputs under the job's directory and, last, a small JSON summary
(``<stage>/<concept>.json`` or ``<stage>.json``): the summary's presence means the stage
is complete, so a rerun into the same directory skips it and a crash loses at most the
stage that was running (training itself resumes from its checkpoint: ``run_erase``).

Where the pieces come from depends on the model, never on the code path:

- a world model (its directory holds ``world_build.json``, or ``--world``): pairs from the
  world's ECG (``make_pairs``), the filter from the world's classifier (``visual_filter``),
  eval from the world suites; the world's concepts and word splits are asked of
  ``ear_dist.world.concepts`` only;
- a real model: pairs from the concept's file or the ECG templates (``data.ecg.templates``
  with the concept's words and surrogates), the filter from ``data.vf`` (when enabled),
  eval from the concepts' suite files and ``eval.suites``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ear_dist.config import Config, load_config
from ear_dist.data.pairs import PromptPair
from ear_dist.errors import RunFailure
from ear_dist.many.spec import ConceptEntry, ConceptsFileError, ManySpec
from ear_dist.storage import write_text_atomic

COMMAND = "erase-many"
STAGES = ("pairs", "filter", "train", "merge", "eval")
WORLD_RECIPE = "world-ear"  # a world model's erasure settings under the user's recipes, as the demo uses
WORLD_ANCHORS = 64  # anchor prompts of the kept concepts when the method wants anchors and none are given
WORLD_ANCHOR_STREAM = 43_000


class Stopped(Exception):
    """Training was asked to stop (preemption, Ctrl-C) and checkpointed; the same command resumes it."""


# --------------------------------------------------------------------------- the model the job runs on


@dataclass
class Target:
    """The model erased: its path and family, and the world it was built on (None for a real model)."""

    model_path: str
    family: str
    world: object = None

    @property
    def is_world(self) -> bool:
        return self.world is not None


def world_of(model_path: str, family: str):
    """The world a model directory was built on (its ``world_build.json``), or None."""
    from ear_dist.config import WorldConfig, from_dict
    from ear_dist.world.pretrain import BUILD_INFO_FILE
    from ear_dist.world.var_world import world_for

    info_file = Path(model_path) / BUILD_INFO_FILE
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    return world_for(from_dict(WorldConfig, info["config"]), family)


def job_config(args) -> tuple[Config, Target]:
    """The config every stage starts from and the model it runs on. On a world model the world's erasure
    settings (recipe ``world-ear``, on the CPU) come first, under the user's recipes, config files and ``--set``."""
    from ear_dist.models.family import detect_family

    overrides = list(args.overrides)
    if args.world:
        from ear_dist.world.pretrain import build_world_model

        cfg = load_config(files=args.config, overrides=overrides, recipes=args.recipe)
        path, _ = build_world_model(cfg.world, progress=True, family=cfg.model.family)
        overrides.append(f"model.path={path}")
    probe = load_config(files=args.config, overrides=overrides, recipes=args.recipe)
    family = detect_family(probe.model.path) or probe.model.family
    world = world_of(probe.model.path, family)
    if world is not None:
        overrides.insert(0, "model.device=cpu")
    recipes = ([WORLD_RECIPE] if world is not None else []) + list(args.recipe)
    cfg = load_config(files=args.config, overrides=[*overrides, f"model.family={family}"], recipes=recipes)
    if world is not None:
        cfg.world = world.config
    return cfg, Target(cfg.model.path, family, world)


# --------------------------------------------------------------------------- checks before any work


def training_words(entry: ConceptEntry, target: Target) -> list[str]:
    """The words a concept's pairs may use: the entry's, else (world) its train split, else its name."""
    if not target.is_world:
        return entry.words or [entry.name]
    from ear_dist.world.concepts import concept_words

    allowed = list(concept_words(target.world, entry.name, "train"))
    return entry.words or allowed


def searched_out_words(erased: list[ConceptEntry], target: Target) -> list[str]:
    """What adversarial erasure's search leaves out: every word of the erased concepts (on the world all of
    their splits, so no adversarial pair trains on a word the evaluation keeps)."""
    words = [w for e in erased for w in [e.name, *e.words]]
    if target.is_world:
        from ear_dist.world.concepts import all_concept_words

        words += all_concept_words(target.world, [e.name for e in erased])
    return list(dict.fromkeys(words))


def check_job(spec: ManySpec, target: Target, cfg: Config) -> None:
    """Everything the file and the config must agree on, before a model is loaded (exit 2, naming the field)."""
    for i, entry in enumerate(spec.concepts):
        label = f"{spec.path}: concepts[{i}] ({entry.name})"
        if target.is_world:
            from ear_dist.world.concepts import concept_words, world_concepts

            known = world_concepts(target.world)
            if entry.name not in known:
                raise ConceptsFileError(f"{label}: field 'name': not a concept of the world "
                                        f"(its concepts: {', '.join(known)})")
            allowed = set(concept_words(target.world, entry.name, "train"))
            for word in entry.words:
                if word not in allowed:
                    held = {s for s in ("validation", "heldout") if word in concept_words(target.world, entry.name, s)}
                    why = f"a {' and '.join(sorted(held))} word of the world" if held else "not a word of the world"
                    raise ConceptsFileError(f"{label}: field 'words': {word!r} is {why}; training pairs may use "
                                            f"only {', '.join(sorted(allowed))}")
        elif not entry.pairs and not cfg.data.ecg.templates:
            raise ConceptsFileError(f"{label}: field 'pairs': none given and data.ecg.templates is empty; give a "
                                    "pairs file or set data.ecg.templates (with data.ecg.slots) for ECG")
        elif not entry.pairs and not (entry.surrogates or cfg.data.ecg.surrogates):
            raise ConceptsFileError(f"{label}: field 'surrogates': none given and data.ecg.surrogates is empty; ECG "
                                    "needs surrogate concepts")
    if target.is_world:
        from ear_dist.world.concepts import world_concepts

        for k in spec.keep:
            if k not in world_concepts(target.world):
                raise ConceptsFileError(f"{spec.path}: field 'keep': {k!r} is not a concept of the world")
    if spec.route == "array" and target.family != "janus":
        raise ConceptsFileError(f"{spec.path}: field 'route': array merges per-concept deltas with `ear-dist "
                                f"merge`'s Janus path; a {target.family} model takes route: joint")


# --------------------------------------------------------------------------- stage bookkeeping


@dataclass
class StageRecord:
    """What one stage did for one concept (or for all: concept '')."""

    stage: str
    concept: str
    seconds: float
    skipped: bool = False
    facts: dict = field(default_factory=dict)


class Layout:
    """Where each stage writes under the job's directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def summary(self, stage: str, name: str = "") -> Path:
        return self.root / stage / f"{name}.json" if name else self.root / f"{stage}.json"

    def pairs(self, stage: str, entry: ConceptEntry) -> Path:
        return self.root / stage / f"{entry.slug}.jsonl"

    def run_dir(self, name: str) -> Path:
        return self.root / "train" / name

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def composed_delta(self) -> Path:
        return self.root / "merge" / "delta.safetensors"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"


def _done(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _write_pairs(path: Path, pairs: list[PromptPair]) -> None:
    _write(path, "".join(json.dumps(p.to_dict()) + "\n" for p in pairs))


def _read_pairs(path: Path) -> list[PromptPair]:
    return [PromptPair.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the job


class ManyConceptJob:
    """One many-concept job in one directory; ``run`` does every stage not yet complete."""

    def __init__(self, spec: ManySpec, cfg: Config, target: Target, out: Path, log: Callable[[str], None] = print,
                 progress: bool = False, should_stop: Optional[Callable[[], bool]] = None):
        self.spec, self.cfg, self.target = spec, cfg, target
        self.layout = Layout(out)
        self.log, self.progress, self.should_stop = log, progress, should_stop
        self.records: list[StageRecord] = []
        self._base = None

    # ---- helpers
    def base_model(self):
        if self._base is None:
            from ear_dist.models.family import load_model

            c = self.cfg.model
            self._base = load_model(c.path, c.family, device=c.device, dtype=c.dtype, seed=c.seed)
        return self._base

    def _stage(self, stage: str, entry: Optional[ConceptEntry], work: Callable[[], dict], number: str) -> dict:
        """Run ``work`` unless its summary exists; record and print one progress line either way."""
        name = entry.name if entry else ""
        path = self.layout.summary(stage, entry.slug if entry else "")
        found = _done(path)
        what = f"[{stage} {number}]" + (f" {name}" if name else "")
        if found is not None:
            self.records.append(StageRecord(stage, name, found.get("seconds", 0.0), True, found))
            self.log(f"{what}: done before, skipped ({path})")
            return found
        t0 = time.perf_counter()
        facts = work()
        facts["seconds"] = time.perf_counter() - t0
        _write(path, json.dumps(facts, indent=2))
        self.records.append(StageRecord(stage, name, facts["seconds"], False, facts))
        self.log(f"{what}: {facts.get('line', 'done')} in {facts['seconds']:.1f} s")
        return facts

    def kept_concepts(self) -> list[str]:
        """The concepts preservation is measured on: ``keep``, else (world) every concept not erased."""
        if self.spec.keep or not self.target.is_world:
            return list(self.spec.keep)
        from ear_dist.world.concepts import world_concepts

        return [c for c in world_concepts(self.target.world) if c not in self.spec.names]

    # ---- stage 1: pairs
    def make_pairs(self, entry: ConceptEntry) -> dict:
        n = self.spec.pairs_per_concept
        if entry.pairs:
            from ear_dist.data.readers import read_pairs

            pairs = read_pairs(entry.pairs, self.cfg.data.format, self.cfg.data.on_error, concept=entry.name)
            source = f"file {entry.pairs}"
        elif self.target.is_world:
            from ear_dist.world.erasure import make_pairs

            words = training_words(entry, self.target)
            # no pair shows another concept of the job: a surrogate, a sentence's style or object is a kept one
            pairs = make_pairs(self.target.world, entry.name, n, avoid=self.spec.names)
            source = f"world ECG ({', '.join(words)})"
        else:
            pairs = self._template_pairs(entry, n)
            source = "ECG templates"
        dropped = 0
        if not self.target.is_world:
            # a pair whose surrogate names another concept of the job would teach the student to draw it
            from ear_dist.data.ecg import mentions

            others = [w for e in self.spec.concepts if e.name != entry.name
                      for w in dict.fromkeys([e.name, *training_words(e, self.target)])]
            kept = [p for p in pairs if not any(mentions(p.surrogate, w) for w in others)]
            dropped, pairs = len(pairs) - len(kept), kept
            if dropped:
                source += f"; {dropped} dropped: their surrogate names another concept of the job"
        if not pairs:
            raise RunFailure(f"concept {entry.name!r}: no pairs from {source}")
        for p in pairs:  # each pair carries the concept it erases, by the file's name where the target says it
            if entry.name in p.target.lower():
                p.concept = entry.name
        _write_pairs(self.layout.pairs("pairs", entry), pairs)
        return {"pairs": len(pairs), "source": source, "dropped_naming_other_concepts": dropped,
                "line": f"{len(pairs)} pairs ({source})"}

    def _template_pairs(self, entry: ConceptEntry, n: int) -> list[PromptPair]:
        from ear_dist.data.ecg import template_pairs

        from ear_dist.world.erasure import concept_offset

        e = self.cfg.data.ecg
        words = training_words(entry, self.target)
        # each concept of a job of several draws its own templates and surrogates (one seed for all gave
        # pair i of every concept the same template and surrogate)
        offset = concept_offset(entry.name) if len(self.spec.names) > 1 else 0
        pairs: list[PromptPair] = []
        for i, word in enumerate(words):
            share = n // len(words) + (1 if i < n % len(words) else 0)
            for p in template_pairs(word, e.templates, entry.surrogates or e.surrogates, e.slots, share,
                                    e.seed + offset + i, entry.category or e.category):
                pairs.append(p)
        return pairs

    # ---- stage 2: the visual filter
    def filter_pairs(self, entry: ConceptEntry) -> dict:
        pairs = _read_pairs(self.layout.pairs("pairs", entry))
        if self.target.is_world:
            from ear_dist.world.erasure import visual_filter

            kept, report = visual_filter(self.target.world, self.base_model(), pairs, entry.name,
                                         self.cfg.rollout.guidance_weight)
            facts = {"total": len(pairs), "kept": len(kept), "dropped": {
                "target without the concept": report.dropped_target_without_concept,
                "surrogate with the concept": report.dropped_surrogate_with_concept}, "classifier": "world"}
        elif self.cfg.data.vf.enabled:
            kept, facts = self._real_filter(pairs)
        else:
            kept, facts = pairs, {"total": len(pairs), "kept": len(pairs), "dropped": {}, "classifier": "off"}
        if not kept:
            raise RunFailure(f"concept {entry.name!r}: the visual filter kept none of {len(pairs)} pairs "
                             f"({facts['dropped']}); the model does not draw it from these prompts")
        _write_pairs(self.layout.pairs("filter", entry), kept)
        facts["line"] = f"kept {len(kept)} of {len(pairs)} ({facts['classifier']})"
        return facts

    def _real_filter(self, pairs: list[PromptPair]) -> tuple[list[PromptPair], dict]:
        from ear_dist.data.vf import VisualFilter, build_classifier, teacher_functions

        v, r = self.cfg.data.vf, self.cfg.rollout
        classifier = build_classifier(v.classifier, v.classifier_path, v.threshold, v.nudenet_classes or None,
                                      v.class_ids, v.labels, v.top_k)
        generate, decode = teacher_functions(self.base_model(), r.guidance_weight, r.temperature, r.top_k,
                                             r.batch_size, r.decode)
        vf = VisualFilter(generate, decode, classifier, v.batch_size, v.store_target_tokens, v.seed)
        kept = vf.run(pairs, progress=self.progress)
        return kept, {"total": vf.report.total, "kept": vf.report.kept, "dropped": dict(vf.report.dropped),
                      "classifier": v.classifier}

    # ---- stage 3: training
    def anchors(self, erased: list[str], entries: list[ConceptEntry]) -> list[str]:
        """Anchor prompts: the entries' own, plus (world, when the method wants anchors and the config names none)
        training-template prompts of the kept concepts; never a prompt of an erased concept's entry."""
        from ear_dist.data.readers import read_pairs

        out = [a for e in entries for a in e.anchors]
        for e in entries:
            if e.anchors_file:
                out += [p.target for p in read_pairs(e.anchors_file, concept=e.name)]
        p = self.cfg.preserve
        wants = p.weight > 0 or p.nullspace
        if wants and not out and not p.prompts and not p.prompts_file and self.target.is_world:
            out = self._world_anchors(erased)
        return list(dict.fromkeys(out))

    def _world_anchors(self, erased: list[str]) -> list[str]:
        from ear_dist.world.concepts import object_concepts, style_concepts

        world = self.target.world
        kept = set(self.kept_concepts()) - set(erased)
        objects = [o for o in object_concepts(world) if o in kept] or \
            [o for o in object_concepts(world) if o not in erased]
        styles = [None] + [s for s in style_concepts(world) if s in kept]
        return world.sample(WORLD_ANCHORS, "train", stream=WORLD_ANCHOR_STREAM, objects=objects, styles=styles).prompts

    def run_config(self, name: str, erased: list[ConceptEntry], steps: int) -> Config:
        from ear_dist.config import from_dict

        cfg = from_dict(Config, self.cfg.to_dict())
        cfg.train.out_dir = str(self.layout.run_dir(name))
        cfg.train.steps = steps
        cfg.erase.concept = erased[0].name
        anchors = self.anchors(self.spec.names, erased)
        if anchors:
            cfg.preserve.prompts = list(cfg.preserve.prompts) + anchors
        if cfg.erase.adversarial.every and not cfg.erase.adversarial.exclude:
            cfg.erase.adversarial.exclude = searched_out_words(erased, self.target)
        return cfg.validate()

    def train(self, name: str, erased: list[ConceptEntry]) -> dict:
        from ear_dist.train.trainer import run_erase

        per_concept = self.cfg.train.steps
        steps = self.spec.steps or per_concept * len(erased)
        cfg = self.run_config(name, erased, steps)
        pairs = [p for e in erased for p in _read_pairs(self.layout.pairs("filter", e))]
        summary = run_erase(cfg, pairs, progress=self.progress, should_stop=self.should_stop)
        if summary.get("stopped"):
            raise Stopped(f"training {name} stopped after step {summary['step']}, checkpoint {summary['checkpoint']}")
        keep = ("delta", "optimizer_steps", "windows_kept", "windows_total", "seconds", "step")
        return {**{k: summary[k] for k in keep if k in summary}, "steps": steps, "pairs": len(pairs),
                "anchors": len(cfg.preserve.prompts), "concepts": [e.name for e in erased],
                "line": f"{steps} steps on {len(pairs)} pairs of {', '.join(e.name for e in erased)}"}

    # ---- stage 4: merge (array)
    def merge(self) -> dict:
        from ear_dist.models import merge as merging
        from ear_dist.models.delta import delta_metadata, load_delta, save_delta
        from ear_dist.models.family import load_model

        deltas = [_done(self.layout.summary("train", e.slug))["delta"] for e in self.spec.concepts]
        options = {} if self.spec.compose == "sum" else {"compose": self.compose_option()}
        result = merging.merge(self.target.model_path, deltas, self.layout.merged, conflicts="warn", **options)
        for warning in result["warnings"]:
            self.log(f"warning: {warning}")
        # the merged model's trained tensors as one delta: what eval applies is exactly what the merge wrote
        names = sorted({n for d in deltas for n in load_delta(d)[0]})
        merged = dict(load_model(str(self.layout.merged), self.target.family, device="cpu",
                                 dtype="float32").model.named_parameters())
        meta = delta_metadata(deltas[0])
        save_delta(self.layout.composed_delta, {n: merged[n].detach().clone() for n in names},
                   meta["base_fingerprint"], self.target.model_path, self.spec.names,
                   {"compose": self.spec.compose, "deltas": deltas}, extra={"merged_model": str(self.layout.merged)})
        return {"merged": str(self.layout.merged), "delta": str(self.layout.composed_delta), "deltas": deltas,
                "compose": self.spec.compose, "tensors": len(names), "warnings": result["warnings"],
                "line": f"{len(deltas)} deltas composed ({self.spec.compose}) into {self.layout.merged}"}

    def compose_option(self):
        """The ``compose`` argument of ``merge`` for a method other than ``sum`` (``ear_dist.models.compose``):
        the method, each concept's training prompts and the kept concepts' prompts."""
        from ear_dist.models.compose import ComposeSpec

        concept_prompts = tuple(tuple(p.target for p in _read_pairs(self.layout.pairs("filter", e)))
                                for e in self.spec.concepts)
        kept = [a for e in self.spec.concepts for a in e.anchors]
        if not kept and self.target.is_world:
            kept = self._world_anchors(self.spec.names)
        return ComposeSpec(method=self.spec.compose, concept_prompts=concept_prompts, kept_prompts=tuple(kept),
                           guidance_weight=self.cfg.rollout.guidance_weight)

    # ---- stage 5: eval
    def suites(self) -> tuple[list, dict[str, str], dict[str, str]]:
        """The eval suites, {erased concept: suite name} and {kept concept without a preservation group anywhere:
        the suite whose test prompts measure it}."""
        if not self.target.is_world:
            from ear_dist.eval.suites import load_suites

            files = [e.suite for e in self.spec.concepts if e.suite] + list(self.cfg.eval.suites)
            suites = load_suites(files, self.cfg) if files else []
            by_concept = {s.concept.lower(): s.name for s in suites if s.concept.lower() in self.spec.names}
            return suites, by_concept, {}
        from ear_dist.world.suite import world_suite

        suites = [world_suite(self.cfg, c, self.target.world) for c in self.spec.names]
        by_concept = {c: s.name for c, s in zip(self.spec.names, suites)}
        covered = {p.group for s in suites for p in s.prompts if p.role == "preservation"}
        own = {}
        for k in self.kept_concepts():
            if k not in covered:
                suites.append(world_suite(self.cfg, k, self.target.world))
                own[k] = suites[-1].name
        return suites, by_concept, own

    def evaluate(self, column_name: str, delta: str) -> dict:
        from ear_dist.eval.evaluate import run_eval
        from ear_dist.eval.generate import Column

        suites, by_concept, own = self.suites()
        if not suites:
            return {"skipped": "no eval suite: give each concept a 'suite' file or set eval.suites",
                    "line": "no suites, skipped"}
        report = run_eval(self.cfg, suites, [Column(column_name, (delta,))], self.layout.eval_dir,
                          progress=self.progress, log=self.log)
        return {"report": str(self.layout.eval_dir / "report.json"), "column": column_name,
                "suites": by_concept, "kept_suites": own, "images": sum(len(s.prompts) for s in suites) * 2,
                "line": f"{len(suites)} suites, report {self.layout.eval_dir / 'report.md'}"} \
            if report is not None else {"line": "not rank 0"}

    # ---- the whole job
    def run(self, array_task: Optional[int] = None) -> Optional[dict]:
        """Every stage not complete; ``array_task``: pairs, filter and training of that concept only."""
        entries = self.spec.concepts if array_task is None else [self.spec.concepts[array_task]]
        n = len(self.spec.concepts)
        t0 = time.perf_counter()
        for stage, work in (("pairs", self.make_pairs), ("filter", self.filter_pairs)):
            for i, e in enumerate(entries):
                self._stage(stage, e, lambda e=e, work=work: work(e), f"{(array_task or 0) + i + 1}/{n}")
        if self.spec.route == "joint":
            self._stage("train", None, lambda: self.train("joint", self.spec.concepts), "joint")
        else:
            for i, e in enumerate(entries):
                self._stage("train", e, lambda e=e: self.train(e.slug, [e]), f"{(array_task or 0) + i + 1}/{n}")
        if array_task is not None:
            self.log(f"array task {array_task} ({entries[0].name}) done; the merge and eval step runs after the "
                     "last task")
            return None
        if self.spec.route == "joint":
            delta, column = _done(self.layout.summary("train"))["delta"], "joint"
        else:
            delta, column = self._stage("merge", None, self.merge, "all")["delta"], "composed"
        self._stage("eval", None, lambda: self.evaluate(column, delta), "all")
        from ear_dist.many.report import write_report

        report = write_report(self, time.perf_counter() - t0)
        self.log(f"report: {self.layout.root / 'report.md'}, {self.layout.root / 'report.json'}")
        return report


def prepare_out_dir(out, spec: ManySpec, cfg: Config, overwrite: bool) -> Path:
    """The job's directory by the output-path rule (``ear_dist.paths``): a directory this job wrote (same
    concepts file contents, same settings) is resumed; another is refused, or with ``--overwrite`` cleared."""
    from ear_dist.paths import MARKER, check_not_an_input, directory_path, output_dir, read_marker, write_marker

    settings = cfg.to_dict()
    identity = {"concepts": spec.digest(), "route": spec.route, "settings": _digest(settings)}
    protect = [("model", cfg.model.path), *[("pairs file", e.pairs) for e in spec.concepts if e.pairs],
               ("concepts file", spec.path)]
    root = directory_path(out, "--out")
    # the concepts file `ear-dist submit` copies into <out>/slurm is the job's own, not an input to protect
    protect = [(label, p) for label, p in protect if not (label == "concepts file" and Path(p).parent == root / "slurm")]
    if root.is_dir() and {p.name for p in root.iterdir()} <= {"slurm", MARKER, MARKER + ".tmp"}:
        check_not_an_input(root, protect, "--out")  # only what `ear-dist submit` wrote there: the job's to use
    else:
        root = output_dir(out, COMMAND, overwrite=overwrite, protect=protect, identity=identity)
    marker = read_marker(root)
    if overwrite and root.is_dir() and (marker is None or marker.get("identity") != identity):
        for child in root.iterdir():
            if child.name != "slurm":  # the scripts `ear-dist submit` wrote for this job
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    # the array tasks of one Slurm job start together and write the same two files: the first write wins
    _write_once(root / MARKER, lambda: write_marker(root, COMMAND, identity),
                lambda: (read_marker(root) or {}).get("identity") == identity)
    text = json.dumps({**spec.to_dict(), "settings": settings}, indent=2)
    _write_once(root / "concepts.json", lambda: write_text_atomic(root / "concepts.json", text),
                lambda: (root / "concepts.json").read_text() == text)
    return root


def _write_once(path: Path, write: Callable[[], object], same: Callable[[], bool]) -> None:
    """``write`` unless ``path`` already holds the same; a write that lost a race to an identical one is fine."""
    from ear_dist.errors import StorageError

    if path.is_file() and same():
        return
    try:
        write()
    except StorageError:
        if not (path.is_file() and same()):
            raise


def _digest(data: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def records_json(records: list[StageRecord]) -> list[dict]:
    return [asdict(r) for r in records]


