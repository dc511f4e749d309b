"""Offline placement: teacher rollouts and targets computed once, read back by every run.

``ear-dist teacher precompute`` writes, for every pair, the image tokens and the
teacher's targets on both prompts into safetensors shards plus ``index.json`` (pair
key -> shard, slot). A sweep over many runs (thresholds, window lengths, learning
rates) then pays for the teacher once. Safetensors rather than tar: the trainer
visits pairs in its own shuffled order, so it needs random access, which
memory-mapped safetensors give without reading a shard front to back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ear_dist.teacher.engine import ColocatedTeacher, TeacherEngine, TeacherTargets

INDEX = "index.json"
FORMAT = "ear-dist-teacher/1"


def pair_key(target: str, surrogate: str, seed: int) -> str:
    return hashlib.sha1(f"{target}\x00{surrogate}\x00{seed}".encode()).hexdigest()[:20]


def precompute(teacher: ColocatedTeacher, batches, out_dir: Path, mode: str, with_uncond: bool,
               meta: dict, max_per_shard: int = 256, progress: bool = True) -> dict:
    """Write tokens + targets for every PairBatch in ``batches``; returns the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "mode": mode, "with_uncond": with_uncond, "meta": meta, "shards": [], "pairs": {}}
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

    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="teacher precompute", unit="batch")
    for batch in it:
        tokens = batch.tokens if batch.tokens is not None else teacher.rollout(batch.surrogate_prompts, batch.seeds)
        t = teacher.targets(batch.target_prompts, batch.surrogate_prompts, tokens, mode, with_uncond)
        for i in range(len(batch)):
            key = pair_key(batch.target_prompts[i], batch.surrogate_prompts[i], batch.seeds[i])
            buf[f"{slot}.tokens"] = tokens[i].cpu().contiguous()
            buf[f"{slot}.on_target"] = t.on_target[i].cpu().contiguous()
            buf[f"{slot}.on_surrogate"] = t.on_surrogate[i].cpu().contiguous()
            if with_uncond:
                buf[f"{slot}.uncond"] = t.uncond[i].cpu().contiguous()
            index["pairs"][key] = [len(index["shards"]), slot]
            slot += 1
            if slot >= max_per_shard:
                flush()
    flush()
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(out_dir / INDEX)  # written last: a directory with an index is complete
    return index


class OfflineTeacher(TeacherEngine):
    """Serves precomputed tokens and targets; a pair that was not precomputed is a clear error."""

    def __init__(self, directory: str, device: torch.device, dtype: Optional[torch.dtype] = None):
        self.dir = Path(directory)
        idx = self.dir / INDEX
        if not idx.is_file():
            raise FileNotFoundError(f"{idx}: no teacher index; run `ear-dist teacher precompute` first")
        self.index = json.loads(idx.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{idx}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.device, self.dtype = device, dtype
        self._files = [safe_open(str(self.dir / s), framework="pt") for s in self.index["shards"]]

    def _get(self, target: str, surrogate: str, seed: int, field: str) -> torch.Tensor:
        key = pair_key(target, surrogate, seed)
        if key not in self.index["pairs"]:
            raise KeyError(f"{self.dir}: pair ({target!r} -> {surrogate!r}, seed {seed}) was not precomputed")
        shard, slot = self.index["pairs"][key]
        t = self._files[shard].get_tensor(f"{slot}.{field}").to(self.device)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def lookup_tokens(self, targets: Sequence[str], surrogates: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._get(t, s, sd, "tokens") for t, s, sd in zip(targets, surrogates, seeds)])

    def rollout(self, prompts, seeds):
        raise RuntimeError("offline teacher: tokens come with the batch (lookup_tokens); no rollout is run")

    def bind(self, targets: Sequence[str], surrogates: Sequence[str], seeds: Sequence[int]) -> None:
        """The pairs of the coming step (their seeds identify the precomputed rollout)."""
        self._seeds = {(t, s): sd for t, s, sd in zip(targets, surrogates, seeds)}

    def targets(self, target_prompts, surrogate_prompts, tokens, mode, with_uncond=False) -> TeacherTargets:
        if mode != self.index["mode"] or (with_uncond and not self.index["with_uncond"]):
            raise ValueError(f"{self.dir}: precomputed {self.index['mode']} targets (uncond="
                             f"{self.index['with_uncond']}), the run asks for {mode} (uncond={with_uncond})")
        seeds = [self._seeds[(t, s)] for t, s in zip(target_prompts, surrogate_prompts)]
        rows = list(zip(target_prompts, surrogate_prompts, seeds))
        stored = torch.stack([self._get(t, s, sd, "tokens") for t, s, sd in rows])
        if not torch.equal(stored, tokens.to(stored.device)):
            raise ValueError(f"{self.dir}: the batch's tokens differ from the precomputed rollout")
        on_t = torch.stack([self._get(t, s, sd, "on_target") for t, s, sd in rows])
        on_s = torch.stack([self._get(t, s, sd, "on_surrogate") for t, s, sd in rows])
        un = torch.stack([self._get(t, s, sd, "uncond") for t, s, sd in rows]) if with_uncond else None
        return TeacherTargets(on_t, on_s, un)
