"""The evaluation job: suites x columns -> images on every rank -> metrics and report on rank 0.

    load suites, the base model, check every delta against it      (errors before any work)
    build the classifiers, CLIP and FID feature models (rank 0)    (missing weights: reported, others go on)
    per column: deltas applied in memory, this rank's missing images generated; perplexity (rank 0)
    gather every rank's keys on rank 0: each image exactly once
    rank 0: concept accuracy, preservation, token shift, CLIP, FID -> report.md / report.json / grids / plot
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ear_dist.config import Config
from ear_dist.eval.attacks import patch_context, prepare_attacks
from ear_dist.eval.generate import Column, Entry, generate_column, manifest_rows, plan, rank_share, read_png, \
    write_manifest
from ear_dist.eval.metrics import MetricUnavailable
from ear_dist.eval.metrics.clip import ClipScorer, clip_summary
from ear_dist.eval.metrics.concept import JUDGED_ROLES, build_judges, check_classifiers_know, part_counts, \
    summarize
from ear_dist.eval.metrics.fid import build_feature_model, cached_stats, feature_stats, files_id, frechet_distance, \
    paper_note, reference_images, stats_cache_root
from ear_dist.eval.metrics.perplexity import perplexity, read_text_lines
from ear_dist.eval.metrics.tokens import kl_divergence, token_floor, token_histogram, total_variation
from ear_dist.eval.report import write_report
from ear_dist.eval.suites import Suite, load_suites
from ear_dist.errors import InputError, RunFailure
from ear_dist.telemetry.memory import peak_memory, reset_peak_memory

BASE = "base"
SHIFT_ROLES = ("unrelated", "caption")


def make_columns(deltas: Sequence[Union[str, Column]]) -> list[Column]:
    """"base" plus one column per delta; NAME=PATH names a column, else the delta's folder (or file stem).

    A ``Column`` given as is may hold several deltas (composed in memory)."""
    columns, names = [Column(BASE)], {BASE}
    for spec in deltas:
        if isinstance(spec, Column):
            if spec.name in names:
                raise InputError(f"two columns are named {spec.name!r}")
            names.add(spec.name)
            columns.append(spec)
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            path = spec
            p = Path(spec)
            name = p.parent.name if p.stem == "delta" and p.parent.name else p.stem
        candidate, i = name, 2
        while candidate in names:
            candidate, i = f"{name}-{i}", i + 1
        names.add(candidate)
        columns.append(Column(candidate, (path,)))
    return columns


@dataclass
class Tools:
    """What judges the images, built once on rank 0; ``not_run`` says what could not be built and why."""

    judges: dict = field(default_factory=dict)
    clip: Optional[ClipScorer] = None
    features: Optional[object] = None
    not_run: list[str] = field(default_factory=list)  # asked for, could not run
    notes: list[str] = field(default_factory=list)  # not asked for


def build_tools(suites: Sequence[Suite], cfg: Config, device: str) -> Tools:
    tools = Tools()
    tools.judges, errors = build_judges(suites, cfg, device)
    tools.not_run += list(errors.values())
    if any("caption" in s.roles() for s in suites):
        if cfg.eval.clip_path:
            try:
                tools.clip = ClipScorer(cfg.eval.clip_path, device)
            except MetricUnavailable as e:
                tools.not_run.append(str(e))
        else:
            tools.notes.append("CLIP score: not computed (eval.clip_path is empty; set it to a local CLIP directory, "
                               "e.g. openai/clip-vit-large-patch14)")
        try:
            tools.features = build_feature_model(cfg.eval.fid_features, cfg.eval.fid_model_path, device)
        except MetricUnavailable as e:
            tools.not_run.append(str(e))
    return tools


def run_eval(cfg: Config, suites: Sequence[Union[str, Suite]], deltas: Sequence[Union[str, Column]],
             out_dir: Union[str, Path],
             progress: bool = True, log: Callable[[str], None] = print) -> Optional[dict]:
    """Evaluate the base model and each delta on the suites; returns the report on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from ear_dist.distributed.runtime import init_runtime
    from ear_dist.models.delta import check_deltas
    from ear_dist.models.family import load_model
    from ear_dist.models.fingerprint import model_fingerprint

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    suites = load_suites(suites, cfg)
    check_classifiers_know(suites, cfg)  # before a model is loaded or an image made
    columns = make_columns(deltas)
    rt = init_runtime(cfg)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)  # object collectives under NCCL use the current device
    main = rt.rank == 0
    log = log if main else (lambda *_: None)
    bundle = load_model(cfg.model.path, cfg.model.family, device=rt.device, dtype=cfg.model.dtype,
                        seed=cfg.model.seed)
    for suite in suites:
        suite.check_model(bundle.num_image_tokens, bundle.codebook_size, cfg.model.path)
        if bundle.family != "janus" and any(p.negative for p in suite.prompts):
            raise InputError(f"suite {suite.name}: negative prompts are implemented for the janus family only (model "
                             f"{cfg.model.path} is {bundle.family}); set eval.guidance_negative=false")
    check_deltas(bundle.model, [d for c in columns for d in c.deltas])
    fingerprint = model_fingerprint(bundle.model)
    # attack suites: each column's prompts (and learned tensors), prepared once per (suite, column) over the ranks
    attacks = prepare_attacks(bundle, suites, columns, fingerprint, out_dir, rt.rank, rt.world_size, log,
                              barrier=dist.barrier if rt.distributed else None)
    entries = plan(suites, columns, cfg, fingerprint, out_dir, attacks)
    tools = build_tools(suites, cfg, str(rt.device)) if main else Tools()
    for message in tools.not_run:
        log(f"warning: {message}")
    for message in tools.notes:
        log(f"note: {message}")
    renders = {s.render_id: s.render for s in suites if s.render is not None}

    shares = {c.name: rank_share(entries, c.name, rt.rank, rt.world_size) for c in columns}
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s) for s in shares.values()), desc=f"eval images (rank 0 of {rt.world_size})",
                   unit="img")
    mine, ppl = {}, {}
    for column in columns:
        reset_peak_memory(rt.device)
        patches = {s.name: functools.partial(patch_context, s, bundle, attacks[(s.name, column.name)][0])
                   for s in suites if s.patch is not None}
        stats = generate_column(bundle, column, shares[column.name], renders, cfg, bar.update if bar else None,
                                patches)
        memory = peak_memory(rt.device)
        mine[column.name] = {"keys": stats.keys, "generated": stats.generated, "reused": stats.reused,
                             "seconds": stats.seconds, "plans": stats.plans, "peak_memory_gib": memory.peak_gib,
                             "peak_memory_kind": memory.kind}
        if main:
            ppl[column.name] = _perplexities(bundle, column, suites, cfg, tools)
    if bar:
        bar.close()
    gathered = [mine]
    if rt.distributed:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, mine)  # the last collective: rank 0 goes on alone (finish_job waits for it)
    if not main:
        return None
    made_by = _check_gathered(entries, columns, gathered)
    write_manifest(out_dir / "manifest.jsonl", manifest_rows(entries, made_by))
    generation = {c.name: {"generated": sum(g[c.name]["generated"] for g in gathered),
                           "reused": sum(g[c.name]["reused"] for g in gathered)} for c in columns}
    for name, g in generation.items():
        log(f"{name}: {g['generated']} images generated, {g['reused']} reused from an earlier run")
    verdicts: dict = {}
    results = compute_metrics(suites, columns, entries, tools, cfg, bundle.codebook_size, verdicts=verdicts)
    report = write_report(out_dir, cfg, suites, columns, entries, results, ppl, tools, generation,
                          {"ranks": rt.world_size, "seconds": time.perf_counter() - t0,
                           "sampling": sampling_throughput(columns, gathered)}, verdicts)
    log(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}")
    return report


def sampling_throughput(columns: Sequence[Column], gathered: Sequence[dict]) -> dict:
    """Per column: images generated over the slowest rank's generation time (images/s, and per device), the
    largest peak memory of a rank while generating, and rank 0's sampling plan."""
    out = {}
    for column in columns:
        ranks = [g[column.name] for g in gathered]
        generated = sum(r["generated"] for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        rate = generated / seconds if generated and seconds > 0 else None
        out[column.name] = {
            "generated": generated, "seconds": seconds, "images_per_s": rate,
            "images_per_s_per_device": rate / len(ranks) if rate is not None else None,
            "peak_memory_gib": max(r["peak_memory_gib"] for r in ranks),
            "peak_memory_kind": ranks[0]["peak_memory_kind"], "plans": ranks[0]["plans"]}
    return out


def _perplexities(bundle, column: Column, suites: Sequence[Suite], cfg: Config, tools: Tools) -> dict:
    from ear_dist.models.compose import composed_in_memory

    texts = {}
    if cfg.eval.perplexity_text:
        try:
            texts["text file"] = read_text_lines(cfg.eval.perplexity_text)
        except MetricUnavailable as e:
            if str(e) not in tools.not_run:
                tools.not_run.append(str(e))
    concept_prompts = list(dict.fromkeys(p.prompt for s in suites for p in s.prompts if p.role == "concept"))
    if concept_prompts:
        texts["concept prompts"] = concept_prompts
    out = {}
    with composed_in_memory(bundle, list(column.deltas), column.compose):
        for name, lines in texts.items():
            try:
                out[name] = perplexity(bundle, lines)
            except MetricUnavailable as e:
                out[name] = {"not_run": str(e)}
    return out


def _check_gathered(entries: Sequence[Entry], columns: Sequence[Column], gathered: Sequence[dict]) -> dict[str, int]:
    """Every planned key of every column produced by exactly one rank, its PNG on disk. Returns key -> rank."""
    made_by: dict[str, int] = {}
    for column in columns:
        expected = {e.key for e in entries if e.column == column.name}
        counts: dict[str, int] = {}
        for rank, g in enumerate(gathered):
            for key in g[column.name]["keys"]:
                counts[key] = counts.get(key, 0) + 1
                made_by[key] = rank
        twice = sorted(k for k, n in counts.items() if n > 1)
        lost = sorted(expected - set(counts))
        if twice or lost or set(counts) - expected:
            raise RunFailure(f"column {column.name}: {len(twice)} images made by several ranks, {len(lost)} by none "
                               f"(first: {(twice or lost)[:3]}); the ranks disagree about the job list")
    missing = [e.path for e in entries if not Path(e.path).is_file()]
    if missing:
        raise RunFailure(f"{len(missing)} images are not on disk after generation (first: {missing[0]}); "
                           "the ranks must share the output directory")
    return made_by


def verdict_caption(concept: str, found) -> str:
    """What the classifier said of one image, for the grid: "church: yes", "nudity: no (0.12)", with the
    classifier's label when it names one ("church: yes, church 0.91")."""
    said = "yes" if found.present else "no"
    score = found.score if found.score not in (0.0, 1.0) else None
    detail = ", ".join(x for x in (found.label, "" if score is None else f"{score:.2f}") if x)
    return f"{concept}: {said}" + (f" ({detail})" if detail else "")


class _Images:
    """Reads each PNG once (pixels and tokens)."""

    def __init__(self):
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        if path not in self.cache:
            self.cache[path] = read_png(path)
        return self.cache[path]


def compute_metrics(suites: Sequence[Suite], columns: Sequence[Column], entries: Sequence[Entry], tools: Tools,
                    cfg: Config, codebook_size: int, batch_size: int = 32, verdicts: Optional[dict] = None) -> dict:
    """column -> suite -> metrics (see report.py for what each means). ``verdicts``: filled with each judged
    image's path -> the classifier's verdict on it (``verdict_caption``), for the report's grids."""
    images = _Images()
    results: dict = {c.name: {} for c in columns}
    base_fid: dict = {}
    for suite in suites:
        judge = tools.judges.get(suite.name)
        for column in columns:
            rows = [e for e in entries if e.suite == suite.name and e.column == column.name]
            res: dict = {}
            judged = [e for e in rows if e.role in JUDGED_ROLES]
            if judged and judge is not None:
                found = []
                for s in range(0, len(judged), batch_size):
                    batch = judged[s : s + batch_size]
                    loaded = [images(e.path) for e in batch]
                    found += judge.detect([x[0] for x in loaded], [x[1] for x in loaded], [e.concept for e in batch])
                if verdicts is not None:
                    verdicts.update({e.path: verdict_caption(e.concept, d) for e, d in zip(judged, found)})
                groups = [e.group for e in judged]
                res.update(summarize(suite, groups, [d.present for d in found],
                                     None if column.name == BASE else results[BASE].get(suite.name)))
                if judge.info.get("classifier") == "nudenet":
                    res["nudenet_parts"] = part_counts(groups, found, suite)
            shifted = [e for e in rows if e.role in SHIFT_ROLES]
            if shifted:
                hist = token_histogram((images(e.path)[1] for e in shifted), codebook_size)
                res["_token_histogram"] = hist
                if column.name == BASE:
                    res["token_floor"] = token_floor([images(e.path)[1] for e in shifted], codebook_size)
                else:
                    ref = results[BASE][suite.name]["_token_histogram"]
                    res["token_tv"] = total_variation(hist, ref)
                    res["token_kl"] = kl_divergence(ref, hist)
                    res["token_floor"] = results[BASE][suite.name]["token_floor"]
            captions = [e for e in rows if e.role == "caption"]
            if captions and tools.clip is not None:
                res["clip"] = clip_summary(tools.clip.cosines([images(e.path)[0] for e in captions],
                                                              [e.prompt for e in captions]))
                res["clip"]["convention"] = cfg.eval.clip_convention
            if captions and tools.features is not None:
                res["fid"] = _fid(suite, column, captions, base_fid, tools, cfg, images)
            results[column.name][suite.name] = res
    for column in results.values():
        for res in column.values():
            res.pop("_token_histogram", None)
    return results


def _fid(suite: Suite, column: Column, captions: Sequence[Entry], base_fid: dict, tools: Tools, cfg: Config,
         images: _Images) -> dict:
    """Frechet distance of a column's caption images to the reference (real images, else the base column's)."""
    model = tools.features
    feats = model.features([images(e.path)[0] for e in captions])
    mu, sigma = feature_stats(feats)
    cache = stats_cache_root(cfg.eval.stats_cache_dir)
    if cfg.eval.fid_reference:
        try:
            files = reference_images(cfg.eval.fid_reference)
        except MetricUnavailable as e:
            return {"not_run": str(e)}

        def compute():
            from PIL import Image

            return model.features([np.asarray(Image.open(p).convert("RGB")) for p in files])

        ref_mu, ref_sigma, cached = cached_stats(cache, suite.name, model, files_id(files), compute)
        reference = f"{len(files)} images in {cfg.eval.fid_reference}"
        note = paper_note(model.name, len(captions), True)
    else:
        note = paper_note(model.name, len(captions), False)
        if column.name == BASE:
            base_fid[suite.name] = (mu, sigma)
            return {"fd": 0.0, "reference": "the base column's images", "images": len(captions),
                    "paper_note": note, **model.describe()}
        ref_mu, ref_sigma = base_fid[suite.name]
        cached, reference = False, "the base column's images (no eval.fid_reference given)"
    return {"fd": frechet_distance(mu, sigma, ref_mu, ref_sigma), "reference": reference, "images": len(captions),
            "reference_stats_cached": cached, "paper_note": note, **model.describe()}
