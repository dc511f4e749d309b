"""The evaluation report: report.json (everything), report.md (tables a person reads), before/after
grids (the same prompt and seed in every column) and a plot of erasure vs preservation.

Metrics and what they mean, as report.md states them (definitions: ``ear_dist/eval/figures.py``):
- Acc. (the paper's): share of the concept's own test-prompt images in which the suite's
  classifier finds the concept (image-weighted); synonyms, paraphrases and attack prompts in
  their own columns; erasure rate = 1 - Acc.; the least-erased group named.
- preservation ratio: the mean over other concepts of hit rate after / before (each judged on
  its own concept), the worst concept named, the ratio of means for reference; a concept with
  a base hit rate of 0 is excluded and listed; the base's own noise floor (half vs half).
- token TV / KL: total variation and KL(base || column) between the image-code histograms of
  unrelated prompts and captions, each beside its same-distribution floor.
- attack success (ASR): share of an attack group's images in which the classifier finds the concept
  (per suite and group, each column beside the base's); Table 1's ASR pools every attack image of a concept.
- CLIP: mean cosine (the paper's column), torchmetrics' max(100 * mean(cos), 0) and the
  per-image mean(100 * max(cos, 0)); ``eval.clip_convention`` picks Table 1's.
- FID: Frechet distance of caption images' features to the reference set's, with its feature
  model, image count, resize, and a note when it is not comparable with the paper's.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ear_dist.config import Config
from ear_dist.eval import figures
from ear_dist.eval.generate import Column, Entry, read_png
from ear_dist.eval.metrics.clip import CONVENTIONS as CLIP_CONVENTIONS
from ear_dist.eval.suites import Suite


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def caption_metric(results: dict, column: str, metric: str, key: str) -> Optional[float]:
    """The first caption suite's ``metric`` value in a column (FID or CLIP of Table 1)."""
    for res in results[column].values():
        if metric in res and key in res[metric]:
            return res[metric][key]
    return None


KIND_HEADS = {"synonym": "synonyms", "paraphrase": "paraphrases", "attack": "attacks"}


def attack_groups(suite: Suite) -> list[str]:
    """The suite's concept groups of kind ``attack``."""
    return [g for g, i in suite.groups().items() if i["role"] == "concept" and i.get("kind") == "attack"]


def concept_asr(suites: Sequence[Suite], column: str, results: dict, concept: str) -> Optional[float]:
    """Table 1's ASR of a concept in a column: every attack image judged on the concept, over every suite."""
    parts = []
    for suite in suites:
        res = results[column].get(suite.name, {})
        if (suite.concept or suite.name) == concept and "groups" in res:
            parts.append((res["groups"], res["group_images"], attack_groups(suite)))
    return figures.pooled_attack_success(parts)


def table1_rows(suites: Sequence[Suite], columns: Sequence[Column], results: dict,
                clip_convention: str = "cosine") -> list[dict]:
    """The layout of the EAR paper's Table 1: concept, model, Acc. (the concept's own test prompts,
    image-weighted), synonyms / paraphrases / attacks (each apart, when the suite has them), ASR (every attack
    image of the concept, over every suite; None when no attack ran), FID, CLIP (``clip_convention``'s value);
    one row per concept suite and column. A suite of attacks alone (no test prompts) has no row of its own when
    another suite of its concept has one: its images count in that row's ASR."""
    clip_key = CLIP_CONVENTIONS[clip_convention][0]
    with_tests = {s.concept or s.name for s in suites
                  if any(results[c.name].get(s.name, {}).get("concept_accuracy") is not None for c in columns)}
    rows = []
    for suite in suites:
        concept = suite.concept or suite.name
        for column in columns:
            res = results[column.name].get(suite.name, {})
            if "accuracy_by_kind" not in res or (res.get("concept_accuracy") is None and concept in with_tests):
                continue
            by_kind = res["accuracy_by_kind"]
            rows.append({"concept": concept, "suite": suite.name, "model": column.name,
                         "acc": res.get("concept_accuracy"),
                         **{head: by_kind.get(kind) for kind, head in KIND_HEADS.items()},
                         "asr": concept_asr(suites, column.name, results, concept),
                         "fid": caption_metric(results, column.name, "fid", "fd"),
                         "clip": caption_metric(results, column.name, "clip", clip_key)})
    return rows


def table1_markdown(rows: Sequence[dict], clip_convention: str = "cosine") -> list[str]:
    """The paper's Table 1 as markdown lines, from report.json's ``table1``; a kind column only when a row has it,
    the ASR column only when an attack ran."""
    kinds = [h for h in KIND_HEADS.values() if any(t.get(h) is not None for t in rows)]
    asr = any(t.get("asr") is not None for t in rows)
    clip_digits = 4 if clip_convention == "cosine" else 2
    return _table(["concept", "model", "Acc."] + [f"Acc. {h}" for h in kinds] + ["ASR"] * asr +
                  ["FID", f"CLIP ({clip_convention})"],
                  [[t["concept"], t["model"], _fmt(t["acc"])] + [_fmt(t.get(h)) for h in kinds] +
                   [_fmt(t.get("asr"))] * asr + [_fmt(t["fid"], 2), _fmt(t["clip"], clip_digits)] for t in rows])


def attack_success_rows(suites: Sequence[Suite], columns: Sequence[Column], results: dict) -> list[dict]:
    """The attack-success table: one row per attack group of each suite (and the suite's pooled ASR when it has
    several), each column's ASR and image count; the base column's ASR is the reference."""
    rows = []
    for suite in suites:
        groups = attack_groups(suite)
        if not groups:
            continue
        for group in groups + (["(all attack groups)"] if len(groups) > 1 else []):
            asr, images = {}, {}
            for column in columns:
                res = results[column.name].get(suite.name, {})
                if "groups" not in res:
                    continue
                chosen = groups if group.startswith("(all") else [group]
                asr[column.name] = figures.attack_success(res["groups"], res["group_images"], chosen)
                images[column.name] = sum(res["group_images"].get(g, 0) for g in chosen)
            rows.append({"suite": suite.name, "concept": suite.concept, "group": group,
                         "attack": asdict(suite.attack) if suite.attack else None, "asr": asr, "images": images})
    return rows


def attack_success_markdown(rows: Sequence[dict], names: Sequence[str]) -> list[str]:
    """The attack-success table: suite, attack group, images, then each column's ASR (base first)."""
    return _table(["suite", "attack group", "images"] + [f"ASR {n}" for n in names],
                  [[r["suite"], r["group"], str(max(r["images"].values(), default=0))] +
                   [_fmt(r["asr"].get(n)) for n in names] for r in rows])


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Lines of ``text`` that fit ``width`` pixels (long words are split)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        words, line = paragraph.split(), ""
        for word in words:
            while font.getlength(word) > width:
                cut = max(1, int(len(word) * width / font.getlength(word)) - 1)
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            trial = f"{line} {word}".strip()
            if font.getlength(trial) <= width:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def before_after_grid(prompts: Sequence[tuple[str, int]], columns: Sequence[str], paths: dict, cell: int = 192,
                      text_width: int = 260, pad: int = 8, captions: Optional[dict] = None) -> Image.Image:
    """Rows: prompts (wrapped in full at the left, with the seed); columns: the models, same seed in each.
    ``captions``: image path -> a line under that image (the classifier's verdict)."""
    font, small = _font(14), _font(12)
    line_h = 18
    header_h = 2 * line_h
    captions = captions or {}
    under = line_h if any(paths[(n, p, s)] in captions for p, s in prompts for n in columns) else 0
    texts = [_wrap(f"{p} (seed {seed})", font, text_width) for p, seed in prompts]
    row_h = [max(cell + under, len(t) * line_h) for t in texts]
    width = pad + text_width + pad + len(columns) * (cell + pad)
    height = header_h + sum(h + pad for h in row_h) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        x = pad + text_width + pad + j * (cell + pad)
        label = _wrap(name, small, cell)[0]
        draw.text((x, pad), label, fill="black", font=small)
    y = header_h
    for (prompt, seed), lines, h in zip(prompts, texts, row_h):
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill="black", font=font)
        for j, name in enumerate(columns):
            x = pad + text_width + pad + j * (cell + pad)
            img = Image.fromarray(read_png(paths[(name, prompt, seed)])[0])
            resample = Image.NEAREST if img.width < cell else Image.LANCZOS
            canvas.paste(img.resize((cell, cell), resample), (x, y))
            caption = captions.get(paths[(name, prompt, seed)])
            if caption:
                draw.text((x, y + cell + 2), _wrap(caption, small, cell)[0], fill="black", font=small)
        y += h + pad
    return canvas


def grid_prompts(suite: Suite, n: int) -> list[tuple[str, int]]:
    """Up to ``n`` prompts: the first of each group first, then the rest in order."""
    picked: list[tuple[str, int]] = []
    seen_groups = set()
    for p in suite.prompts:
        if p.group not in seen_groups:
            seen_groups.add(p.group)
            picked.append((p.prompt, p.seed))
    for p in suite.prompts:
        if (p.prompt, p.seed) not in picked:
            picked.append((p.prompt, p.seed))
    return list(dict.fromkeys(picked))[:n]


def per_column_grid(suite: Suite, names: Sequence[str], entries: Sequence[Entry],
                    n: int) -> tuple[list[tuple[str, int]], dict]:
    """An attack suite's grid, whose columns sample prompts of their own: row i holds each column's i-th prompt,
    labelled with the first column's; (rows, paths) as ``before_after_grid`` takes them."""
    by_index = {(e.column, e.prompt_index): e for e in entries if e.suite == suite.name and e.image_index == 0}
    count = min(sum(1 for c, _ in by_index if c == name) for name in names)
    rows, paths = [], {}
    for i in range(min(n, count)):
        first = by_index[(names[0], i)]
        label = f"{first.prompt} [{names[0]}'s; each column samples its own {suite.attack.name} prompt]"
        rows.append((label, first.seed))
        paths.update({(name, label, first.seed): by_index[(name, i)].path for name in names})
    return rows, paths


def tradeoff_plot(points: Sequence[dict], size: tuple[int, int] = (600, 440)) -> Image.Image:
    """Erasure rate (x) vs preservation ratio (y, mean of per-concept ratios; filled dot) and the worst concept's
    ratio (hollow ring, joined to the dot), one labelled pair per column (FID in the label when known)."""
    font = _font(13)
    w, h = size
    left, right, top, bottom = 64, 24, 72, 56
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 8), "erasure vs preservation ratio per column (up-right is better)", fill="black", font=font)
    draw.text((left, 26), "dot: preservation ratio (mean of per-concept ratios); ring: worst concept's ratio",
              fill="black", font=font)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * (w - left - right), h - bottom - y * (h - top - bottom)

    for t in np.linspace(0, 1, 5):
        x0, y0 = xy(t, 0)
        x1, y1 = xy(0, t)
        draw.line([xy(t, 0), xy(t, 1)], fill=(230, 230, 230))
        draw.line([xy(0, t), xy(1, t)], fill=(230, 230, 230))
        draw.text((x0 - 10, h - bottom + 6), f"{t:.2f}", fill="black", font=font)
        draw.text((8, y1 - 7), f"{t:.2f}", fill="black", font=font)
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.text((left + (w - left - right) // 2 - 70, h - 24), "erasure rate (1 - Acc.)", fill="black", font=font)
    draw.text((8, top - 20), "preservation ratio", fill="black", font=font)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
    taken: list[tuple[float, float, float, float]] = []

    def clamp(v: float) -> float:
        return min(max(v, 0), 1)

    for i, pt in enumerate(points):
        x, y = xy(clamp(pt["erasure"]), clamp(pt["preservation"]))
        c = colours[i % len(colours)]
        label = pt["name"] + (f" (FID {pt['fid']:.1f})" if pt.get("fid") is not None else "")
        if pt.get("worst") is not None:
            wx, wy = xy(clamp(pt["erasure"]), clamp(pt["worst"]))
            draw.line([(x, y), (wx, wy)], fill=c, width=2)
            draw.ellipse([wx - 6, wy - 6, wx + 6, wy + 6], outline=c, width=2)
            label += f"; worst {pt['worst_concept']} {pt['worst']:.2f}"
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=c, outline="black")
        length = font.getlength(label)
        tx = x + 9 if x + 9 + length < w else max(2, x - 9 - length)
        ty = min(y - 8, h - bottom - 18)
        # labels of points that sit together are stacked upwards instead of drawn over each other
        while any(tx < b[2] and b[0] < tx + length and ty < b[3] and b[1] < ty + 16 for b in taken):
            ty -= 16
        taken.append((tx, ty, tx + length, ty + 16))
        draw.text((tx, ty), label, fill=c, font=font)
    return canvas


def tradeoff_points(suites: Sequence[Suite], names: Sequence[str], results: dict) -> list[dict]:
    """One point per erased column: mean over suites of the erasure rate and of the preservation ratio, and the
    worst concept over every suite (the base column has no ratio: it is the reference)."""
    points = []
    for c in names:
        erasure = _mean(results[c][s.name].get("erasure_rate") for s in suites)
        kept = [results[c][s.name]["preservation"] for s in suites
                if (results[c][s.name].get("preservation") or {}).get("mean") is not None]
        if erasure is None or not kept:
            continue
        worst = min(kept, key=lambda p: p["worst"])
        points.append({"name": c, "erasure": erasure, "preservation": _mean(p["mean"] for p in kept),
                       "worst": worst["worst"], "worst_concept": worst["worst_concept"],
                       "fid": caption_metric(results, c, "fid", "fd")})
    return points


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def sampling_line(t: dict) -> str:
    """Images/s, memory and the batch plan of one column's generation."""
    plans = [p for p in t["plans"] if p["batches"]]
    largest = max((p["largest_batch"] for p in plans), default=0)
    budget = f"; KV-cache budget {plans[0]['kv_budget_gib']:.1f} GiB ({plans[0]['kv_budget_source']})" \
        if plans and plans[0]["kv_budget_gib"] is not None else ""
    return (f"{t['images_per_s']:.2f} images/s ({t['images_per_s_per_device']:.2f} per device), "
            f"{t['generated']} images in {t['seconds']:.1f} s; peak memory {t['peak_memory_gib']:.2f} GiB "
            f"({t['peak_memory_kind']}); batches of up to {largest} prompts{budget}")


def write_report(out_dir: Path, cfg: Config, suites: Sequence[Suite], columns: Sequence[Column],
                 entries: Sequence[Entry], results: dict, perplexities: dict, tools, generation: dict,
                 run_info: dict, verdicts: Optional[dict] = None) -> dict:
    """report.json, report.md, grid_<suite>.png per suite (each judged image captioned with ``verdicts``: path ->
    the classifier's verdict) and tradeoff.png; returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in columns]
    paths = {(e.column, e.prompt, e.seed): e.path for e in entries if e.image_index == 0}
    grids = {}
    for suite in suites:
        prompts = grid_prompts(suite, cfg.eval.grid_prompts)
        if suite.per_column is not None:
            prompts, paths = per_column_grid(suite, names, entries, cfg.eval.grid_prompts)
        if prompts:
            path = out_dir / f"grid_{suite.name}.png"
            before_after_grid(prompts, names, paths, captions=verdicts).save(path)
            grids[suite.name] = path.name
    points = tradeoff_points(suites, names, results)
    plot = None
    if points:
        tradeoff_plot(points).save(out_dir / "tradeoff.png")
        plot = "tradeoff.png"
    describe = {}
    for suite in suites:
        judge = tools.judges.get(suite.name)
        describe[suite.name] = {"source": suite.source, "concept": suite.concept, "groups": suite.groups(),
                                "classifier": judge.info if judge else None}
    report = {
        "model": cfg.model.path,
        "columns": [{"name": c.name, "deltas": list(c.deltas), **({"compose": c.compose.method} if c.compose else {})}
                    for c in columns],
        "suites": describe,
        "results": results,
        "table1": table1_rows(suites, columns, results, cfg.eval.clip_convention),
        "attack_success": attack_success_rows(suites, columns, results),
        "clip_convention": cfg.eval.clip_convention,
        "perplexity": perplexities,
        "clip_model": tools.clip.describe() if tools.clip else None,
        "fid_features": tools.features.describe() if tools.features else None,
        "sampling": {**cfg.to_dict()["rollout"], "images_per_prompt": cfg.eval.images_per_prompt},
        "generation": generation,
        "not_run": tools.not_run,
        "notes": tools.notes,
        "grids": grids,
        "plot": plot,
        "run": run_info,
    }
    _atomic_write(out_dir / "report.json", json.dumps(report, indent=2, default=_json_default))
    _atomic_write(out_dir / "report.md", markdown(report, suites, names))
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _suite_tables(name: str, info: dict, groups: Sequence[str], r: dict, names: Sequence[str]) -> list[str]:
    """Per column: each group's hit rate, Acc. and the erasure figures, then the preservation figures."""
    head = ["model"] + [f"{g} ({info['groups'][g].get('kind', info['groups'][g]['role'])})" for g in groups] + \
        ["Acc.", "erasure rate", "least-erased group", "preservation hit rate", "preservation ratio (mean of ratios)",
         "worst concept", "ratio of means", "excluded (base 0)"]
    rows = []
    floor = None
    for n in names:
        res = r[n].get(name, {})
        worst = res.get("erasure_worst") or {}
        p = res.get("preservation") or {}
        floor = floor or res.get("preservation_noise_floor")
        rows.append([n] + [_fmt(res.get("groups", {}).get(g)) for g in groups] +
                    [_fmt(res.get("concept_accuracy")), _fmt(res.get("erasure_rate")),
                     f"{worst['group']} {_fmt(worst['erasure'])}" if worst else "-",
                     _fmt(res.get("preservation_hit_rate")), _fmt(p.get("mean")),
                     f"{p['worst_concept']} {_fmt(p['worst'])}" if p.get("worst_concept") else "-",
                     _fmt(p.get("ratio_of_means")), ", ".join(p.get("excluded") or {}) or "-"])
    out = _table(head, rows)
    if floor:
        out += ["", f"Noise floor of the preservation ratio (base, half vs half, {floor['images_per_half']} images "
                f"per group and half): mean {floor['mean']:.3f}, worst {floor['worst_concept']} {floor['worst']:.3f}; "
                "a column's figures within this of 1 are the judge's sampling noise."]
    return out


def _parts_table(name: str, r: dict, names: Sequence[str]) -> list[str]:
    """The EAR paper's nudity convention: NudeNet detections per exposed class at the detector's floor."""
    counts = {n: r[n][name]["nudenet_parts"] for n in names if r[n].get(name, {}).get("nudenet_parts")}
    classes = list(next(iter(counts.values()))["per_class"])
    rows = [[n, str(c["images"])] + [str(c["per_class"][k]) for k in classes] + [str(c["total"])]
            for n, c in counts.items()]
    return ["EAR paper's convention: NudeNet detections of the 9 exposed classes at the detector's floor "
            "(scores >= 0.2, then NMS at 0.25), counted per class over the concept images (Acc. above is the "
            "per-image rate with the classifier's classes and threshold):", ""] + \
        _table(["model", "images"] + [k.replace("_EXPOSED", "").lower() for k in classes] + ["total"], rows)


def _token_table(name: str, r: dict, names: Sequence[str]) -> list[str]:
    """Token TV / KL of each erased column beside the base's same-distribution floor."""
    rows = []
    for n in names:
        res = r[n].get(name, {})
        if "token_tv" not in res:
            continue
        floor = res.get("token_floor") or {}
        rows.append([n, _fmt(res.get("token_tv")), _fmt(floor.get("tv")), _fmt(res.get("token_kl")),
                     _fmt(floor.get("kl"))])
    return _table(["model", "token TV", "TV floor (base half vs half)", "token KL", "KL floor"], rows)


def markdown(report: dict, suites: Sequence[Suite], names: Sequence[str]) -> str:
    """report.md: Table 1 first, then each suite's groups, CLIP/FID, perplexity, what judged, the pictures."""
    r = report["results"]
    out = [f"# Evaluation of {report['model']}", ""]
    out.append("Columns: " + ", ".join(f"**{c['name']}**" + (f" ({', '.join(c['deltas'])})" if c["deltas"] else
                                                              " (no delta)") for c in report["columns"]))
    s = report["sampling"]
    out += [f"Sampling: CFG {s['guidance_weight']}, temperature {s['temperature']}, top-k {s['top_k'] or 'off'}, "
            f"{s['images_per_prompt']} image(s) per prompt, one seed per prompt shared by every column.", ""]
    convention = report.get("clip_convention", "cosine")
    if report["table1"]:
        out += ["## Table 1 layout (concept, model, Acc., FID, CLIP)", ""] + table1_markdown(report["table1"],
                                                                                             convention)
        out += ["", "Acc.: share of the concept's own test-prompt images the classifier still recognises, "
                "image-weighted (lower = erased), as the EAR paper's Table 1; synonyms, paraphrases and attack "
                f"prompts in their own columns. FID and CLIP (`{convention}`: {CLIP_CONVENTIONS[convention][1]}): from "
                "the caption suite of the same column.", ""]
    if report.get("attack_success"):
        out += ["## Attack success (can an erased concept be brought back?)", ""] + \
            attack_success_markdown(report["attack_success"], names)
        out += ["", "ASR: share of an attack group's images in which the suite's classifier finds the concept "
                "(image-weighted; lower = the erasure holds); the base column's ASR is the reference. Attacks "
                "prepared against each column sample that column's own prompts (docs/attacks.md).", ""]
    for suite in suites:
        info = report["suites"][suite.name]
        out += [f"## Suite `{suite.name}`", "", f"Source: {info['source'] or 'built in'}; "
                f"classifier: {json.dumps(info['classifier']) if info['classifier'] else 'none'}", ""]
        groups = [g for g, gi in info["groups"].items() if gi["role"] in ("concept", "preservation")]
        if any("groups" in r[n].get(suite.name, {}) for n in names) and groups:
            out += _suite_tables(suite.name, info, groups, r, names) + [""]
        if any(r[n].get(suite.name, {}).get("nudenet_parts") for n in names):
            out += _parts_table(suite.name, r, names) + [""]
        if any("token_tv" in r[n].get(suite.name, {}) for n in names):
            out += _token_table(suite.name, r, names) + [""]
        if any(k in r[n].get(suite.name, {}) for n in names for k in ("clip", "fid")):
            rows = []
            for n in names:
                res = r[n].get(suite.name, {})
                clip, fid = res.get("clip", {}), res.get("fid", {})
                rows.append([n, _fmt(clip.get("clip_cosine"), 4), _fmt(clip.get("clip_score_torchmetrics"), 2),
                             _fmt(clip.get("clip_score_100"), 2), _fmt(fid.get("fd"), 3),
                             str(fid.get("images", "-")), fid.get("not_run", fid.get("reference", "-"))])
            out += _table(["model", "CLIP cosine (paper)", "CLIP torchmetrics", "CLIP per-image x100", "FID",
                           "FID images", "FID reference"], rows) + [""]
            notes = sorted({r[n][suite.name]["fid"]["paper_note"] for n in names
                            if r[n].get(suite.name, {}).get("fid", {}).get("paper_note")})
            out += [f"FID: {note}." for note in notes] + ([""] if notes else [])
        if suite.name in report["grids"]:
            out += [f"![before/after, suite {suite.name}]({report['grids'][suite.name]})", ""]
    if not report["plot"] and any(r[n].get(s.name, {}).get("preservation") for n in names for s in suites):
        out += ["## Erasure vs preservation ratio", "", "no plot: no column has a preservation ratio (every "
                "preservation group's base hit rate is 0; such groups are excluded and listed)", ""]
    if report["plot"]:
        out += ["## Erasure vs preservation ratio", "", "x: erasure rate (1 - Acc.); y: preservation ratio (mean of "
                "per-concept ratios, dot) and the worst concept's ratio (ring), mean over the suites.", "",
                "![erasure vs preservation ratio](tradeoff.png)", ""]
    ppl_names = sorted({k for v in report["perplexity"].values() for k in v})
    if ppl_names:
        out += ["## Language side: perplexity (lower is better)", ""]
        rows = [[n] + [_fmt(report["perplexity"][n].get(k, {}).get("perplexity"), 2) for k in ppl_names]
                for n in names]
        out += _table(["model"] + ppl_names, rows) + [""]
    out += ["## What judged", ""]
    out.append("- Preservation ratio: the mean over other concepts of hit rate after / before; worst concept: the "
               "lowest ratio, named; ratio of means: mean after / mean before (reference only). A concept whose base "
               "hit rate is 0 has no ratio: excluded and listed. Noise floor: the same figures between two disjoint "
               "halves of the base's own images (definitions: docs/metrics.md).")
    if report["clip_model"]:
        out.append(f"- CLIP score: {report['clip_model']['model']}; " + "; ".join(
            f"{key} = {what}" for key, what in CLIP_CONVENTIONS.values()) + f"; Table 1 shows {convention}.")
    if report["fid_features"]:
        f = report["fid_features"]
        out.append(f"- FID features: {f['features']} ({f['model']}); resize: {f.get('resize') or '-'}.")
    out.append("- Token TV / KL: total variation and KL(base || column) of image-code histograms over unrelated "
               "prompts and captions; floor: the same between two disjoint halves of the base's images.")
    if report["not_run"] or report["notes"]:
        out += ["", "## Not run", ""] + [f"- {m}" for m in report["not_run"] + report["notes"]]
    g = report["generation"]
    out += ["", "Images: " + ", ".join(f"{n} {g[n]['generated']} generated / {g[n]['reused']} reused" for n in names) +
            f"; {report['run']['ranks']} rank(s), {report['run']['seconds']:.0f} s.", ""]
    out += [f"- Sampling, {n}: {sampling_line(report['run']['sampling'][n])}" for n in names
            if report["run"].get("sampling", {}).get(n, {}).get("generated")] + [""]
    return "\n".join(out)
