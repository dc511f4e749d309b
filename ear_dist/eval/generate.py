"""Distributed, resumable generation of every image an evaluation needs.

Each image is keyed by what determines it: the base model's fingerprint, the exact
bytes of the column's deltas, the prompt, the seed, the sampling settings and how
tokens become pixels. Its PNG is written under a temp name and renamed, with the image
tokens in a PNG text chunk, so a PNG that exists is complete and carries everything
the metrics read. An interrupted evaluation run again regenerates only the keys
without a PNG.

Ranks take every ``world_size``-th image of the sorted job list (done or not), so the
split needs no agreement about what is already on disk; rank 0 gathers every rank's
list of keys and checks that each image was produced exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ear_dist.config import Config
from ear_dist.eval.batching import KvBudget, plan_sampling
from ear_dist.eval.suites import EvalPrompt, Suite
from ear_dist.models.janus.decode import release_decoders
from ear_dist.models.compose import ComposeSpec, composed_in_memory
from ear_dist.models.delta import file_digest
from ear_dist.models.interface import ImageModel
from ear_dist.errors import InputError

TOKENS_KEY = "ear_dist_tokens"
# image j > 0 of a prompt with seed s samples with s + j * stride (a prime, so no two images of nearby seeds meet)
IMAGE_SEED_STRIDE = 1000003


@dataclass(frozen=True)
class Column:
    """One column of the report: the base model with these deltas applied (none: the base itself), composed by
    ``compose`` (None: summed, as ``merge`` does by default; ``ear_dist.models.compose``)."""

    name: str
    deltas: tuple[str, ...] = ()
    compose: Optional[ComposeSpec] = None

    def key_parts(self) -> list:
        """What the column's images depend on: its deltas' bytes and, when not summed, how they are composed."""
        return [file_digest(d) for d in self.deltas] + (self.compose.key() if self.compose else [])


@dataclass(frozen=True)
class Entry:
    """One image of one suite's prompt in one column; ``key`` names the file that holds it."""

    column: str
    suite: str
    group: str
    role: str
    concept: str
    prompt: str
    prompt_index: int
    image_index: int
    seed: int
    render_id: str
    key: str
    path: str
    guidance: Optional[float] = None  # the prompt's own CFG weight; None: rollout.guidance_weight
    negative: str = ""  # the unconditional branch's prompt; empty: the pad prompt
    kind: str = ""  # the concept group's kind (suites.CONCEPT_KINDS)


@dataclass
class GenerationStats:
    """What one rank did for one column; ``seconds``: generating (sampling, decoding, writing), ``plans``: the
    sampling plan of each render group (batches, the largest, the KV-cache budget)."""

    generated: int = 0
    reused: int = 0
    keys: list[str] = field(default_factory=list)
    seconds: float = 0.0
    plans: list[dict] = field(default_factory=list)


def sampling_settings(cfg: Config) -> dict:
    """The rollout settings an image depends on (part of its key). The lean decode modes sample with other noise
    than the eager loop (same distribution), so a sampled, not greedy, image names a non-eager decode."""
    r = cfg.rollout
    out = {"guidance_weight": r.guidance_weight, "temperature": r.temperature, "top_k": r.top_k, "greedy": r.greedy}
    if r.decode != "eager" and not (r.greedy or r.temperature == 0):
        out["decode"] = r.decode
    return out


def image_key(base_fingerprint: str, delta_digests: Sequence[str], prompt: str, seed: int, settings: dict,
              render_id: str) -> str:
    """A stable name for one image: everything that determines its pixels."""
    text = json.dumps([base_fingerprint, list(delta_digests), prompt, int(seed), settings, render_id], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def prompt_settings(settings: dict, p: EvalPrompt) -> dict:
    """The sampling settings of one prompt: its own guidance and negative prompt where it has them (a prompt without
    either keeps the key it always had)."""
    out = dict(settings)
    if p.guidance is not None and float(p.guidance) != float(settings["guidance_weight"]):
        out["guidance_weight"] = float(p.guidance)
    if p.negative:
        out["negative_prompt"] = p.negative
    return out


def plan(suites: Sequence[Suite], columns: Sequence[Column], cfg: Config, base_fingerprint: str,
         out_dir: Path, attacks: Optional[dict] = None) -> list[Entry]:
    """Every (column, suite, prompt, image) of the evaluation, in a fixed order.

    ``attacks``: (suite, column) -> (ColumnAttack, tensors digest) of the attack suites with ``per_column``
    (``ear_dist.eval.attacks.prepare_attacks``): that column samples the attack's prompts. An attack suite's keys
    hold the attack's name, budget and seed, the column and the digest of the tensors it learned."""
    settings = sampling_settings(cfg)
    entries = []
    for column in columns:
        digests = column.key_parts()
        for suite in suites:
            prompts, extra = suite.prompts, {}
            if suite.attack is not None:
                extra = {"attack": {"name": suite.attack.name, "budget": suite.attack.budget,
                                    "seed": int(suite.attack.seed), "column": column.name}}
            if suite.per_column is not None:
                prepared, digest = (attacks or {})[(suite.name, column.name)]
                prompts = prepared.prompts
                extra["attack"]["tensors"] = digest
            for i, p in enumerate(prompts):
                for j in range(cfg.eval.images_per_prompt):
                    seed = p.seed + j * IMAGE_SEED_STRIDE
                    key = image_key(base_fingerprint, digests, p.prompt, seed, {**prompt_settings(settings, p), **extra},
                                    suite.render_id)
                    path = out_dir / "images" / column.name / f"{key}.png"
                    entries.append(Entry(column.name, suite.name, p.group, p.role, p.concept, p.prompt, i, j, seed,
                                         suite.render_id, key, str(path), p.guidance, p.negative, p.kind))
    return entries


def rank_share(entries: Sequence[Entry], column: str, rank: int, world_size: int) -> list[Entry]:
    """This rank's images of a column: every ``world_size``-th unique key, from ``rank`` on."""
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.column == column:
            seen.setdefault(e.key, e)
    unique = list(seen.values())
    return unique[rank::world_size]


def save_png(path: Path, image: np.ndarray, tokens: Sequence[int], prompt: str, seed: int) -> None:
    """The image with its tokens, prompt and seed as PNG text; written to a temp name, then renamed."""
    info = PngInfo()
    info.add_text(TOKENS_KEY, ",".join(str(int(t)) for t in tokens))
    info.add_itxt("ear_dist_prompt", prompt)
    info.add_text("ear_dist_seed", str(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def read_png(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image [H, W, 3], image tokens [T]) of an evaluation PNG."""
    with Image.open(path) as im:
        text = im.text.get(TOKENS_KEY)
        if text is None:
            raise InputError(f"{path}: no {TOKENS_KEY} text chunk; not written by ear-dist eval")
        return np.asarray(im.convert("RGB")), np.array([int(t) for t in text.split(",")], dtype=np.int64)


def generate_column(bundle: ImageModel, column: Column, share: Sequence[Entry], renders: dict[str, Callable],
                    cfg: Config, progress: Optional[Callable[[int], None]] = None,
                    patches: Optional[dict[str, Callable[[], ContextManager]]] = None) -> GenerationStats:
    """Generate this rank's missing images of one column (deltas applied in memory for the duration).

    ``renders`` maps a suite's ``render_id`` to its tokens -> pixels function; a render id
    without one uses the model's VQ decoder. ``patches`` maps a suite's name to a context
    manager factory applied (inside the deltas) while that suite's images of the column are sampled
    (an attack's learned token embeddings). Images sample together when they share the render,
    the patch, the guidance weight and the negative prompt.
    """
    stats = GenerationStats(keys=[e.key for e in share])
    todo = [e for e in share if not Path(e.path).is_file()]
    stats.reused = len(share) - len(todo)
    if progress and stats.reused:
        progress(stats.reused)
    if not todo:
        return stats
    r = cfg.rollout
    t0 = time.perf_counter()
    release_decoders(bundle.model)  # a lean decoder's cache from earlier batches would hide free memory
    budget = KvBudget.of(bundle.device, cfg.eval.kv_cache_gib)
    patches = patches or {}
    with composed_in_memory(bundle, list(column.deltas), column.compose):
        groups: dict[tuple, list[Entry]] = {}
        for e in todo:
            guidance = r.guidance_weight if e.guidance is None else float(e.guidance)
            patched = e.suite if e.suite in patches else ""
            groups.setdefault((e.render_id, patched, guidance, bool(e.negative)), []).append(e)
        for (render_id, patched, guidance, negative), entries in groups.items():
            render = renders.get(render_id)
            with patches[patched]() if patched else contextlib.nullcontext():  # a patched tokenizer counts too
                planned = plan_sampling(bundle, [e.prompt for e in entries], cfg.eval.batch_size, guidance != 1.0,
                                        budget, negatives=[e.negative for e in entries] if negative else None)
                stats.plans.append(planned.describe())
                for sampling_batch in planned.batches:
                    batch = [entries[i] for i in sampling_batch.indices]
                    extra = {"negative_prompts": [e.negative for e in batch]} if negative else {}
                    with torch.no_grad():
                        tokens = bundle.sample([e.prompt for e in batch], guidance, r.temperature, r.top_k,
                                               r.greedy, [e.seed for e in batch], decode=r.decode, **extra)
                    tokens_np = tokens.cpu().numpy()
                    images = render(tokens_np) if render is not None else bundle.decode(tokens)
                    for e, img, tok in zip(batch, images, tokens_np):
                        save_png(Path(e.path), img, tok, e.prompt, e.seed)
                    stats.generated += len(batch)
                    if progress:
                        progress(len(batch))
    release_decoders(bundle.model)  # the sampling batch's KV cache is not kept past the column
    stats.seconds = time.perf_counter() - t0
    return stats


def manifest_rows(entries: Sequence[Entry], made_by: dict[str, int]) -> list[dict]:
    """One JSON row per entry, with the rank that produced (or found) its image."""
    return [{**asdict(e), "rank": made_by.get(e.key, -1)} for e in entries]


def write_manifest(path: Path, rows: Sequence[dict]) -> None:
    """JSON lines, written to a temp name and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
