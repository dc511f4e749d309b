"""Offline placement: teacher rollouts and outputs computed once, read back by every run.

``ear-dist teacher precompute`` writes, for every (pair, seed) a run can draw, the image
tokens and the teacher's outputs on both prompts into safetensors shards plus
``index.json`` (pair key -> shard, slot). A sweep over many runs (thresholds, window
lengths, learning rates) then pays for the teacher once. The index records the
teacher settings and the base model's fingerprint it was computed with; a run whose
settings or base differ is refused rather than silently trained on other targets.
Safetensors rather than tar: the trainer visits pairs in its own shuffled order, so it
needs random access, which memory-mapped safetensors give without reading a shard
front to back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ear_dist.data.stream import PairBatch
from ear_dist.errors import InputError
from ear_dist.teacher.base import Teacher, TeacherOutputs, TeacherRequest, TeacherSettings, register_placement
from ear_dist.teacher.colocated import ColocatedTeacher

INDEX = "index.json"
FORMAT = "ear-dist-teacher/2"


class OfflineTeacherError(InputError, ValueError):
    """A precomputed teacher directory that does not fit the run; the message says why."""


def pair_key(target: str, surrogate: str, seed: int) -> str:
    return hashlib.sha1(f"{target}\x00{surrogate}\x00{seed}".encode()).hexdigest()[:20]


def run_requests(stream, steps: int, settings: TeacherSettings, batch_size: int, device=None
                 ) -> Iterator[TeacherRequest]:
    """Requests covering every (pair, seed) a run's first ``steps`` global batches draw, each once.

    ``stream``: the run's pair stream (``data.stream.open_pair_stream`` with the whole
    batch read here). A pair with its own seed has one rollout; one without is seeded by
    its position in the run's batch stream, so the run's steps are replayed here to get
    those seeds.
    """
    seen: set = set()
    rows: list[tuple] = []
    for _ in range(steps):
        batch = stream.next().local(0, 1)
        tokens = batch.surrogate_tokens if settings.rollout_from == "surrogate" else batch.target_tokens
        for i in range(len(batch)):
            key = (batch.target_prompts[i], batch.surrogate_prompts[i], batch.seeds[i])
            if key not in seen:
                seen.add(key)
                rows.append((key, batch.concepts[i], tokens[i] if tokens is not None else None))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        toks = [c[2] for c in chunk]
        stacked = torch.stack(toks).to(device) if all(t is not None for t in toks) else None
        batch = PairBatch([c[0][0] for c in chunk], [c[0][1] for c in chunk], [c[1] for c in chunk],
                          [c[0][2] for c in chunk])
        request = TeacherRequest.from_batch(settings, batch)
        request.tokens = stacked
        yield request


def precompute(engine: ColocatedTeacher, requests: Iterable[TeacherRequest], out_dir, settings: TeacherSettings,
               meta: dict, max_per_shard: int = 256, progress: bool = True) -> dict:
    """Write tokens + outputs of every request; returns the index (written last: a directory with one is complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "settings": settings.as_dict(), "meta": meta, "shards": [], "pairs": {}}
    buf: dict[str, torch.Tensor] = {}
    slot = 0

    def flush():
        nonlocal buf, slot
        if not buf:
            return
        name = f"teacher-{len(index['shards']):05d}.safetensors"
        tmp = out_dir / (name + ".tmp")
        save_file(buf, str(tmp))
        tmp.replace(out_dir / name)
        index["shards"].append(name)
        buf, slot = {}, 0

    if progress:
        from tqdm import tqdm

        requests = tqdm(requests, desc="teacher precompute", unit="batch")
    for request in requests:
        out = engine.outputs(request)
        for i in range(len(request)):
            index["pairs"][pair_key(request.target_prompts[i], request.surrogate_prompts[i], request.seeds[i])] = \
                [len(index["shards"]), slot]
            buf[f"{slot}.tokens"] = out.tokens[i].cpu().contiguous()
            buf[f"{slot}.on_target"] = out.on_target[i].cpu().contiguous()
            buf[f"{slot}.on_surrogate"] = out.on_surrogate[i].cpu().contiguous()
            if out.uncond is not None:
                buf[f"{slot}.uncond"] = out.uncond[i].cpu().contiguous()
            slot += 1
            if slot >= max_per_shard:
                flush()
    flush()
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(out_dir / INDEX)
    return index


class OfflineTeacher(Teacher):
    """Serves precomputed tokens and outputs; a pair that was not precomputed is a clear error."""

    def __init__(self, directory, device: torch.device, dtype: Optional[torch.dtype] = None,
                 settings: Optional[TeacherSettings] = None, base_fingerprint: Optional[str] = None):
        self.dir = Path(directory)
        idx = self.dir / INDEX
        if not idx.is_file():
            raise OfflineTeacherError(f"{idx}: no teacher index; run `ear-dist teacher precompute` first")
        self.index = json.loads(idx.read_text())
        if self.index.get("format") != FORMAT:
            raise OfflineTeacherError(f"{idx}: format {self.index.get('format')!r}, expected {FORMAT!r} "
                                      "(precompute it again with this version)")
        if settings is not None and self.index["settings"] != settings.as_dict():
            stored = self.index["settings"]
            diff = ", ".join(f"{k}: precomputed {stored.get(k)!r}, run {v!r}"
                             for k, v in settings.as_dict().items() if stored.get(k) != v)
            raise OfflineTeacherError(f"{idx}: precomputed with other teacher settings ({diff}); "
                                      "run `ear-dist teacher precompute` with this run's config")
        stored_fp = self.index.get("meta", {}).get("base_fingerprint")
        if base_fingerprint is not None and stored_fp != base_fingerprint:
            raise OfflineTeacherError(f"{idx}: precomputed from base model {self.index['meta'].get('model')!r} "
                                      f"(fingerprint {stored_fp}), the run's model has fingerprint {base_fingerprint}")
        self.device, self.dtype = device, dtype
        self._files = [safe_open(str(self.dir / s), framework="pt") for s in self.index["shards"]]

    def _get(self, target: str, surrogate: str, seed: int, field: str) -> torch.Tensor:
        key = pair_key(target, surrogate, seed)
        if key not in self.index["pairs"]:
            raise OfflineTeacherError(f"{self.dir}: pair ({target!r} -> {surrogate!r}, seed {seed}) was not "
                                      "precomputed (precompute with the run's data, steps and seed)")
        shard, slot = self.index["pairs"][key]
        t = self._files[shard].get_tensor(f"{slot}.{field}").to(self.device)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        rows = list(zip(request.target_prompts, request.surrogate_prompts, request.seeds))

        def stack(field: str) -> torch.Tensor:
            return torch.stack([self._get(t, s, sd, field) for t, s, sd in rows])

        tokens = stack("tokens")
        if request.tokens is not None and not torch.equal(tokens, request.tokens.to(tokens.device)):
            raise OfflineTeacherError(f"{self.dir}: the batch's stored tokens differ from the precomputed rollout")
        uncond = stack("uncond") if request.settings.with_uncond else None
        return TeacherOutputs(tokens, stack("on_target"), stack("on_surrogate"), uncond)


@register_placement("offline")
def _build(cfg, runtime, bundle, settings, steps) -> OfflineTeacher:
    from ear_dist.config import ConfigError
    from ear_dist.models.fingerprint import model_fingerprint

    if not cfg.dist.teacher_dir:
        raise ConfigError("dist.teacher_dir: the offline placement needs the directory written by "
                                  "`ear-dist teacher precompute`")
    return OfflineTeacher(cfg.dist.teacher_dir, bundle.device, bundle.model.dtype, settings,
                          model_fingerprint(bundle.model))
