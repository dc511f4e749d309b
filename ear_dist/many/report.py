"""The many-concept job's report: report.json and report.md in the job's directory.

Per erased concept: its erasure on its own test prompts and on each held-out word (each a
concept group of its suite), the least-erased group, and the worst erased concept named;
for the kept concepts: the preservation ratio (mean of per-concept ratios) and the worst
kept concept. Every figure is ``ear_dist.eval.figures``'s. A kept concept's hit rate is
pooled over every suite that carries it as a preservation group (groups of equal size: the
plain mean), or taken from its own suite's test prompts when no suite carries it.
Beside them: steps, wall time, and seconds per stage and per concept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ear_dist.eval import figures
from ear_dist.storage import write_text_atomic


def _groups(report: dict, column: str, suite: str) -> dict[str, float]:
    return dict(report["results"][column][suite]["groups"])


def erasure_rows(report: dict, column: str, suites: dict[str, str]) -> dict[str, dict]:
    """{erased concept: figures} from an eval report: erasure (test prompts), per held-out word, before too."""
    from ear_dist.eval.evaluate import BASE

    rows = {}
    for concept, suite in suites.items():
        info = report["suites"][suite]["groups"]
        concept_groups = [g for g, i in info.items() if i["role"] == "concept"]
        tests = [g for g in concept_groups if info[g].get("kind", "test") in ("test", "")]
        after = {g: _groups(report, column, suite)[g] for g in concept_groups}
        before = {g: _groups(report, BASE, suite)[g] for g in concept_groups}
        gone, base = figures.erasure(after, test_groups=tests), figures.erasure(before, test_groups=tests)
        rows[concept] = {
            "erasure_rate": gone.rate, "base_erasure_rate": base.rate,
            "test_groups": tests,
            "heldout_words": {g: 1.0 - after[g] for g in concept_groups if g not in tests},
            "worst_group": gone.worst_group, "worst_group_erasure": gone.worst,
            "unmeasured": figures.unmeasured(base), "groups": gone.groups,
        }
    return rows


def kept_hit_rates(report: dict, column: str, kept: list[str], erased: list[str],
                   own: dict[str, str]) -> tuple[dict[str, float], dict[str, float]]:
    """(base, after) hit rates of the kept concepts (``kept`` empty: every preservation group not erased)."""
    from ear_dist.eval.evaluate import BASE

    pooled: dict[str, list[tuple[float, float]]] = {}
    for suite, body in report["suites"].items():
        for g, info in body["groups"].items():
            if info["role"] == "preservation":
                concept = g
            elif suite in own.values() and info["role"] == "concept" and info.get("kind", "test") in ("test", ""):
                concept = next(k for k, s in own.items() if s == suite)
            else:
                continue
            if concept in erased or (kept and concept not in kept):
                continue
            pooled.setdefault(concept, []).append((_groups(report, BASE, suite)[g], _groups(report, column, suite)[g]))
    base = {c: float(np.mean([b for b, _ in v])) for c, v in pooled.items()}
    after = {c: float(np.mean([a for _, a in v])) for c, v in pooled.items()}
    return base, after


def build_report(job, wall_s: float) -> dict:
    """The report's data from the job's stage summaries and its eval report."""
    from ear_dist.many.job import STAGES, _done

    spec, layout = job.spec, job.layout
    n = len(spec.concepts)
    stages = {}
    for stage in STAGES:
        recs = [r for r in job.records if r.stage == stage]
        if recs:
            total = sum(r.seconds for r in recs)
            stages[stage] = {"seconds": total, "seconds_per_concept": total / n,
                             "skipped_this_run": all(r.skipped for r in recs),
                             "per_concept": {r.concept: r.seconds for r in recs if r.concept}}
    train = {r.concept or "joint": r.facts for r in job.records if r.stage == "train"}
    filtered = {r.concept: {k: r.facts.get(k) for k in ("total", "kept", "dropped")}
                for r in job.records if r.stage == "filter"}
    out = {"concepts": spec.names, "route": spec.route, "compose": spec.compose if spec.route == "array" else None,
           "model": job.target.model_path, "world": job.target.is_world, "kept_concepts": job.kept_concepts(),
           "steps": {k: v.get("steps") for k, v in train.items()}, "pairs": filtered,
           "wall_seconds": wall_s, "stages": stages, "erasure": {}, "preservation": None}
    ev = _done(layout.summary("eval")) or {}
    if "report" not in ev:
        out["eval_skipped"] = ev.get("skipped", "no eval")
        return out
    report = json.loads(Path(ev["report"]).read_text())
    column = ev["column"]
    rows = erasure_rows(report, column, ev["suites"])
    out["erasure"] = rows
    measured = {c: r for c, r in rows.items() if r["worst_group_erasure"] is not None}
    if measured:
        worst = min(measured, key=lambda c: measured[c]["worst_group_erasure"])
        out["worst_erased"] = {"concept": worst, "group": measured[worst]["worst_group"],
                               "erasure": measured[worst]["worst_group_erasure"]}
    base, after = kept_hit_rates(report, column, job.kept_concepts(), spec.names, ev.get("kept_suites", {}))
    if after:
        kept = figures.preservation(base, after)
        out["preservation"] = {**kept.to_dict(), "hit_rates": {c: {"base": base[c], "after": after[c]}
                                                               for c in after}}
    out["eval_report"] = ev["report"]
    return out


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(data: dict) -> str:
    """report.md: one table per question (erasure, preservation, time)."""
    lines = [f"# Many-concept erasure: {', '.join(data['concepts'])}", "",
             f"Route `{data['route']}`" + (f" (composed by `{data['compose']}`)" if data.get("compose") else "")
             + f" on `{data['model']}`; wall time {data['wall_seconds']:.0f} s this run.", ""]
    if data.get("eval_skipped"):
        lines += [f"Eval: {data['eval_skipped']}.", ""]
    if data["erasure"]:
        lines += ["## Erasure (1 - Acc.; higher is better)", "",
                  "| concept | erasure rate (test prompts) | before | held-out words (erasure) | least-erased group |",
                  "|---|---|---|---|---|"]
        for c, r in data["erasure"].items():
            words = ", ".join(f"{g} {_num(v)}" for g, v in r["heldout_words"].items()) or "-"
            lines.append(f"| {c} | {_num(r['erasure_rate'])} | {_num(r['base_erasure_rate'])} | {words} | "
                         f"{r['worst_group']} {_num(r['worst_group_erasure'])} |")
        if data.get("worst_erased"):
            w = data["worst_erased"]
            lines += ["", f"Worst erased concept: **{w['concept']}** ({w['group']}: erasure {_num(w['erasure'])})."]
        lines.append("")
    p = data.get("preservation")
    if p:
        lines += ["## Preservation of the kept concepts (hit rate after / before)", "",
                  f"Preservation ratio (mean of per-concept ratios): **{_num(p['mean'])}**; worst kept concept: "
                  f"**{p['worst_concept']}** {_num(p['worst'])}; ratio of means {_num(p['ratio_of_means'])}.", "",
                  "| kept concept | hit rate before | after | ratio |", "|---|---|---|---|"]
        for c, h in p["hit_rates"].items():
            ratio = p["ratios"].get(c)
            lines.append(f"| {c} | {_num(h['base'])} | {_num(h['after'])} | "
                         f"{_num(ratio) if ratio is not None else 'excluded (base 0)'} |")
        lines.append("")
    lines += ["## Steps and time", "", "| stage | seconds | seconds per concept | this run |", "|---|---|---|---|"]
    for stage, s in data["stages"].items():
        lines.append(f"| {stage} | {s['seconds']:.1f} | {s['seconds_per_concept']:.1f} | "
                     f"{'skipped (done before)' if s['skipped_this_run'] else 'ran'} |")
    lines += ["", "Training steps: " + ", ".join(f"{k} {v}" for k, v in data["steps"].items()) + ".",
              "Pairs after the filter: " + ", ".join(f"{c} {v['kept']} of {v['total']}"
                                                     for c, v in data["pairs"].items()) + "."]
    if data.get("eval_report"):
        lines.append(f"Eval report (images, per-suite tables): `{data['eval_report']}`.")
    return "\n".join(lines) + "\n"


def write_report(job, wall_s: float) -> dict:
    data = build_report(job, wall_s)
    write_text_atomic(job.layout.root / "report.json", json.dumps(data, indent=2))
    write_text_atomic(job.layout.root / "report.md", markdown(data))
    return data
