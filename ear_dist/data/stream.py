"""The training pairs of a run: read, checked, and dealt out as the same stream on every rank.

All ranks walk the same seeded stream of global batches (``train.pairs_per_step``
pairs per optimizer step); student rank r trains on its contiguous slice of each, so
one process and N processes see the same data, and a teacher rank (dedicated
placement) knows what each student trains on without being told.

Two sources, one interface (``next``, ``state_dict``, ``load_state_dict``, ``concepts``):

- ``PairStream``: pairs held in memory. Pair files (JSON, CSV, JSONL, parquet, Hugging
  Face directories) are read whole into it: fine for the thousands of pairs a concept
  has, not for millions.
- ``ShardPairStream``: a shard directory, streamed. Every rank computes the same global
  order from the index alone (``EpochPlan``) and reads only its own slice of each
  global batch, through ``ShardLoader``'s DataLoader workers, which prefetch. Memory
  does not grow with the number of pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ear_dist.data.pairs import PairsError, PromptPair, check_stored_tokens

log = logging.getLogger("ear_dist.data")


@dataclass
class PairBatch:
    """Prompt pairs of one step on one rank, with the rollout tokens the pairs bring (if every pair has them)."""

    target_prompts: list[str]
    surrogate_prompts: list[str]
    concepts: list[str]
    seeds: list[int]
    surrogate_tokens: Optional[torch.Tensor] = None  # [B, T] teacher rollouts of the surrogate prompts
    target_tokens: Optional[torch.Tensor] = None  # [B, T] teacher rollouts of the target prompts

    def __len__(self) -> int:
        return len(self.target_prompts)


@dataclass
class PairCheck:
    """What validating the pairs found (counts for the run summary)."""

    missing_concept: list[str] = field(default_factory=list)


def check_pair(p: PromptPair, where: str, on_missing_concept: str, report: PairCheck) -> None:
    """Reject empty prompts; warn about (or reject) a target prompt without its concept word
    (preservation anchors, whose surrogate is the target itself, carry no concept word)."""
    if not p.target.strip():
        raise PairsError(f"{where}: field 'target' is empty")
    if not p.surrogate.strip():
        raise PairsError(f"{where}: field 'surrogate' is empty")
    if p.concept and not p.is_anchor and p.concept.lower() not in p.target.lower():
        msg = f"{where}: target prompt {p.target!r} does not contain the concept {p.concept!r}"
        if on_missing_concept == "fail":
            raise PairsError(msg + " (set erase.on_missing_concept=warn to train on it anyway)")
        report.missing_concept.append(p.id)
        if len(report.missing_concept) <= 5:
            log.warning(msg + ("; further ones are counted in the summary" if len(report.missing_concept) == 5
                               else ""), extra={"shared": True})


def check_pairs(pairs: Sequence[PromptPair], on_missing_concept: str, num_image_tokens: int,
                codebook_size: Optional[int] = None) -> PairCheck:
    """Check every pair (``check_pair``) and its stored tokens against the model (``check_stored_tokens``)."""
    if not pairs:
        raise PairsError("data.pairs: no prompt pairs to train on")
    report = PairCheck()
    for i, p in enumerate(pairs):
        where = f"pair {i} (id {p.id}, source {p.source or '-'})"
        check_pair(p, where, on_missing_concept, report)
        check_stored_tokens(p, where, num_image_tokens, codebook_size)
    return report


def check_prompt_lengths(pairs: Sequence[PromptPair], bundle) -> None:
    """Every pair's prompts fit the model's context beside an image; a longer one is an error naming the pair (its
    index, id and source file) and its length, before any work. Models without a tokenizer are skipped."""
    if getattr(bundle, "tokenizer", None) is None or not hasattr(bundle, "check_prompt_lengths"):
        return
    prompts, where = [], []
    for i, p in enumerate(pairs):
        for name, text in (("target", p.target), ("surrogate", p.surrogate)):
            prompts.append(text)
            where.append(f"pair {i} (id {p.id}, source {p.source or '-'}), {name}")
    bundle.check_prompt_lengths(prompts, where=where)


def load_training_pairs(cfg) -> list[PromptPair]:
    """The pairs named by ``data.pairs`` (any supported format, or a shard directory), read whole."""
    from ear_dist.data.readers import ReadReport, read_pairs

    if not cfg.data.pairs:
        raise PairsError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    report = ReadReport()
    pairs = read_pairs(cfg.data.pairs, cfg.data.format, cfg.data.on_error, cfg.erase.concept, report)
    if report.skipped:
        log.warning("%s: skipped %d malformed rows: %s", cfg.data.pairs, report.skipped, report.skip_reasons[:5],
                    extra={"shared": True})
    return pairs


def check_source(cfg) -> None:
    """Fail fast, before a model is loaded, when ``data.pairs`` is unset or names nothing on disk."""
    if not cfg.data.pairs:
        raise PairsError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    if not Path(cfg.data.pairs).exists():
        raise PairsError(f"data.pairs: {cfg.data.pairs}: file not found")
    from ear_dist.paths import check_input_file

    check_input_file(cfg.data.pairs, "data.pairs")


def is_shard_source(cfg) -> bool:
    """Whether ``data.pairs`` names a shard directory (streamed) rather than a pairs file (read whole)."""
    if cfg.data.format == "shards":
        return True
    root = Path(cfg.data.pairs)
    return cfg.data.format == "auto" and bool(cfg.data.pairs) and root.is_dir() and (root / "index.json").is_file()


def source_digest(cfg, pairs: Optional[Sequence[PromptPair]] = None) -> str:
    """A short hash of the training data's content (not its path): the pairs given, a shard
    directory's index (which names every shard with its size), or the bytes of the pairs file(s)."""
    import hashlib
    import json

    h = hashlib.sha256()
    if pairs is not None:
        for p in pairs:
            h.update(json.dumps(p.to_dict(), sort_keys=True).encode())
        return h.hexdigest()[:16]
    if not cfg.data.pairs:
        raise PairsError("data.pairs: no pairs file given (e.g. --set data.pairs=pairs.json)")
    root = Path(cfg.data.pairs)
    if is_shard_source(cfg):
        h.update((root / "index.json").read_bytes())
        return h.hexdigest()[:16]
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    for f in files:
        if root.is_dir():  # a dataset directory: which file holds what is part of its content
            h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _stack(rows: list) -> Optional[torch.Tensor]:
    if not rows or any(r is None for r in rows):
        return None
    return torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r in rows]))


@dataclass
class GlobalBatch:
    """The ``pairs_per_step`` pairs of one optimizer step (None where this rank did not read the pair)."""

    step: int
    pairs: list[Optional[PromptPair]]

    def local(self, dp_index: int, dp_world: int, device=None) -> PairBatch:
        """Student ``dp_index``'s contiguous slice, as a PairBatch.

        A pair without its own seed gets ``step * pairs_per_step + position in the global
        batch``, so its rollout does not depend on how many ranks share the batch.
        """
        per_rank = len(self.pairs) // dp_world
        lo = dp_index * per_rank
        chunk = self.pairs[lo: lo + per_rank]
        if any(p is None for p in chunk):
            raise RuntimeError(f"step {self.step}: the slice of student {dp_index} of {dp_world} was not read here")
        seeds = [p.seed if p.seed >= 0 else self.step * len(self.pairs) + lo + i for i, p in enumerate(chunk)]
        sur, tar = _stack([p.surrogate_tokens for p in chunk]), _stack([p.target_tokens for p in chunk])
        return PairBatch([p.target for p in chunk], [p.surrogate for p in chunk], [p.concept for p in chunk], seeds,
                         sur.to(device) if sur is not None and device is not None else sur,
                         tar.to(device) if tar is not None and device is not None else tar)


class PairStream:
    """Endless global batches of ``pairs_per_step`` pairs held in memory, reshuffled each pass (seeded)."""

    def __init__(self, pairs: Sequence[PromptPair], pairs_per_step: int, seed: int = 0, shuffle: bool = True):
        if pairs_per_step > len(pairs):
            raise PairsError(f"train.pairs_per_step: {pairs_per_step} > the {len(pairs)} pairs available")
        self.pairs = list(pairs)
        self.pairs_per_step = pairs_per_step
        self.seed, self.shuffle = seed, shuffle
        self._batches = self._generate(seed, shuffle)
        self.step = 0
        self.replaced = 0  # read errors skipped: none in memory

    def _generate(self, seed: int, shuffle: bool) -> Iterator[list[PromptPair]]:
        """Shuffled: each pass a fresh seeded order, its last partial batch dropped. In file order, every
        pair trains: a pass's last batch is filled from its start, as a shard directory's exact epoch is,
        so the batches are those of the same pairs written to shards (``data.shuffle=false``)."""
        g = torch.Generator().manual_seed(seed)
        n, k = len(self.pairs), self.pairs_per_step
        if not shuffle:
            while True:
                for s in range(0, -(-n // k) * k, k):
                    yield [self.pairs[i % n] for i in range(s, s + k)]
        while True:
            order = torch.randperm(n, generator=g).tolist()
            for s in range(0, n - k + 1, k):
                yield [self.pairs[i] for i in order[s: s + k]]

    def add(self, pairs: Sequence[PromptPair]) -> None:
        """More pairs from the next batch on (adversarial training): the order starts afresh over all pairs,
        seeded by the base seed and the batches drawn so far, so a run that adds the same pairs after the
        same batch draws the same batches (a resumed run replays its additions, ``ear_dist.train.adversarial``)."""
        self.pairs.extend(pairs)
        self._batches = self._generate(self.seed + 1_000_003 * self.step, self.shuffle)

    def state_dict(self) -> dict:
        """The position a checkpoint saves: the steps drawn so far."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["step"]`` global batches (the order is deterministic, so they are redrawn)."""
        for _ in range(int(state["step"]) - self.step):
            self.next()

    def next(self) -> GlobalBatch:
        batch = GlobalBatch(self.step, list(next(self._batches)))
        self.step += 1
        return batch

    def concepts(self) -> list[str]:
        """The concepts the pairs carry, sorted."""
        return sorted({p.concept for p in self.pairs if p.concept})

    def close(self) -> None:
        """Nothing to release (the interface of ``ShardPairStream``)."""


class ShardPairStream:
    """Endless global batches from the shard directory ``data.pairs``; this process reads only the slices
    ``dp_indices``.

    ``dp_world`` student ranks share each global batch of ``train.pairs_per_step``; a
    student reads its own slice, a dedicated teacher rank those of the students it
    serves, an offline precompute (one index of one) the whole batch. ``check``:
    (erase.on_missing_concept, image tokens per image, codebook size) to check each pair
    as it is read.
    """

    def __init__(self, cfg, dp_world: int, dp_indices: Sequence[int], check: Optional[tuple[str, int, int]] = None):
        from ear_dist.data.shards import read_index, shard_loader_from_config

        self.shard_dir = Path(cfg.data.pairs)
        self.index = read_index(self.shard_dir)
        total, pairs_per_step = int(self.index["total_samples"]), cfg.train.pairs_per_step
        if pairs_per_step > total:
            raise PairsError(f"train.pairs_per_step: {pairs_per_step} > the {total} pairs in {self.shard_dir}")
        self.pairs_per_step, self.dp_world, self.per_rank = pairs_per_step, dp_world, pairs_per_step // dp_world
        self.loaders = {i: shard_loader_from_config(cfg, self.per_rank, rank=i, world_size=dp_world,
                                                    expect_tokens=check[1:] if check else None, endless=True)
                        for i in dp_indices}
        self._iters = {i: iter(loader) for i, loader in self.loaders.items()}
        self.on_missing_concept = check[0] if check else "warn"
        self.report = PairCheck()
        self.step = 0

    @property
    def replaced(self) -> int:
        """Samples that stood in for unreadable ones so far (``data.shards.on_corrupt=skip``)."""
        return sum(loader.replaced for loader in self.loaders.values())

    def state_dict(self) -> dict:
        """The position a checkpoint saves: the epoch and the samples of it consumed by all ranks together."""
        position = next(iter(self.loaders.values())).state_dict()
        return {"step": self.step, "epoch": position["epoch"], "consumed": position["consumed"] * self.dp_world}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the sample after the position saved by ``state_dict`` (any number of ranks)."""
        for loader in self.loaders.values():
            loader.load_state_dict({"epoch": state["epoch"], "consumed": int(state["consumed"]) // self.dp_world})
        self.step = int(state["step"])

    def next(self) -> GlobalBatch:
        pairs: list[Optional[PromptPair]] = [None] * self.pairs_per_step
        for i, it in self._iters.items():
            chunk = next(it)
            for j, pair in enumerate(chunk):
                check_pair(pair, f"{self.shard_dir}: pair id {pair.id}", self.on_missing_concept, self.report)
                pairs[i * self.per_rank + j] = pair
        batch = GlobalBatch(self.step, pairs)
        self.step += 1
        return batch

    def concepts(self) -> list[str]:
        """The concepts the index counts, sorted."""
        return sorted(c for c in self.index.get("concept_counts", {}) if c)

    def close(self) -> None:
        """Stop the DataLoader workers."""
        for it in self._iters.values():
            it.close()


def open_pair_stream(cfg, pairs: Optional[Sequence[PromptPair]] = None, dp_world: int = 1,
                     dp_indices: Sequence[int] = (0,), num_image_tokens: Optional[int] = None,
                     codebook_size: Optional[int] = None):
    """The run's pair stream: ``pairs`` (held in memory), a streamed shard directory, or a pairs file read whole.

    Given the model's ``num_image_tokens`` and ``codebook_size``, stored rollout tokens
    are checked before training: every pair held in memory, and a shard directory's
    recorded token ranges (each sample is checked again as it streams).
    Returns (stream, PairCheck of the pairs checked so far).
    """
    k, seed = cfg.train.pairs_per_step, cfg.train.seed
    if pairs is None and is_shard_source(cfg):
        check = None
        if num_image_tokens is not None:
            from ear_dist.data.shards import check_index_tokens

            unrecorded = check_index_tokens(cfg.data.pairs, num_image_tokens, codebook_size)
            if unrecorded:
                log.info("%s: %d shard(s) record no token ranges (written by an older ear-dist); their stored "
                         "tokens are checked as they stream", cfg.data.pairs, unrecorded, extra={"shared": True})
            check = (cfg.erase.on_missing_concept, num_image_tokens, codebook_size)
        stream = ShardPairStream(cfg, dp_world, dp_indices, check)
        return stream, stream.report
    pairs = list(pairs) if pairs is not None else load_training_pairs(cfg)
    report = check_pairs(pairs, cfg.erase.on_missing_concept, num_image_tokens, codebook_size) \
        if num_image_tokens is not None else PairCheck()
    return PairStream(pairs, k, seed, cfg.data.shuffle), report
