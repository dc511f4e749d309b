"""Reading a shard directory for training: ``ShardDataset`` reads an ``EpochPlan`` through
open shards, ``ShardLoader`` batches it (DataLoader workers prefetch) and keeps the
position a checkpoint saves.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ear_dist.data.pairs import PromptPair, check_stored_tokens
from ear_dist.data.shards.index import ShardError, read_index
from ear_dist.data.shards.plan import EpochPlan, ShardPosition, check_plan_settings
from ear_dist.data.shards.tar import OpenShard
from ear_dist.errors import EarDistError

log = logging.getLogger(__name__)


class ShardDataset(IterableDataset):
    """The pairs of a shard directory as an IterableDataset, split by rank and worker.

    ``mode``: ``exact`` (each epoch every rank gets the same number of samples) or
    ``resampled`` (shards drawn with replacement; an endless epoch); ``self.plan`` (an
    ``EpochPlan``) decides which samples, in which order.
    ``on_corrupt``: ``fail`` raises ``ShardError`` naming the shard; ``skip`` logs it
    and serves the next readable sample in the epoch's order in its place, so ranks keep
    equal counts (``self.replaced`` counts these in the process that read them).
    ``expect_tokens``: (image tokens per image, codebook size) of the model; stored
    rollout tokens that do not fit are a ``PairsError`` naming the shard and sample.
    """

    def __init__(
        self,
        shard_dir: Union[str, Path],
        rank: int = 0,
        world_size: int = 1,
        mode: str = "exact",
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        block_size: int = 1,
        drop_last: bool = False,
        on_corrupt: str = "fail",
        decode_tokens: bool = True,
        max_open_shards: int = 4,
        expect_tokens: Optional[tuple[int, int]] = None,
    ):
        # settings first: a typo is reported before the directory is read
        check_plan_settings(mode, rank, world_size, block_size)
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"on_corrupt must be fail or skip, got {on_corrupt!r}")
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        self.counts = [s["samples"] for s in self.index["shards"]]
        self.names = [s["name"] for s in self.index["shards"]]
        self.sizes = [s.get("bytes") for s in self.index["shards"]]
        self.offsets = [self.shard_dir / s["offsets"] if s.get("offsets") else None for s in self.index["shards"]]
        if sum(self.counts) == 0:
            raise ShardError(f"{self.shard_dir}: the index lists no samples")
        try:
            self.plan = EpochPlan(
                self.counts, rank=rank, world_size=world_size, mode=mode, shuffle=shuffle,
                shuffle_buffer=shuffle_buffer, seed=seed, block_size=block_size, drop_last=drop_last,
            )
        except ValueError as e:  # fewer samples than ranks with drop_last
            raise ShardError(f"{self.shard_dir}: {e}") from None
        self.on_corrupt, self.decode_tokens = on_corrupt, decode_tokens
        self.max_open_shards = max_open_shards
        self.expect_tokens = expect_tokens
        self.position = ShardPosition()
        self.replaced = 0
        self.bad_shards: set[str] = set()  # the messages of what could not be read
        self._unopenable: dict[int, str] = {}  # shard -> why it failed to open: replacements pass over them

    # -- position, as saved in a checkpoint
    def state_dict(self) -> dict:
        """The position to save in a checkpoint: ``{"epoch", "consumed"}``."""
        return {"epoch": self.position.epoch, "consumed": self.position.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the next sample is the one after the last consumed."""
        self.position = ShardPosition(int(state["epoch"]), int(state["consumed"]))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample."""
        self.position = ShardPosition(epoch, 0)

    def __len__(self) -> int:
        if self.plan.mode == "resampled":
            raise TypeError("a resampled ShardDataset has no length (its epoch is endless)")
        return self.plan.samples_per_rank()

    # -- iteration
    def __iter__(self) -> Iterator[PromptPair]:
        for pair, notes, _ in self.items():
            for note in notes:
                log.warning("skipping unreadable data: %s", note)
            yield pair

    def items(self, endless: bool = False) -> Iterator[tuple[PromptPair, list[str], bool]]:
        """(pair, what could not be read on the way to it and was first seen here, whether it stands in for an
        unreadable sample), from the current position to the end of its epoch, or on through the
        following epochs (``endless``; DataLoader workers then live as long as the run)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        open_shards: "OrderedDict[int, OpenShard]" = OrderedDict()
        try:
            for epoch, sample_id in self._worker_ids(worker, num_workers, endless):
                notes: list[str] = []
                replaced_before = self.replaced
                pair = self._read(sample_id, open_shards, epoch, notes)
                yield pair, notes, self.replaced > replaced_before
        finally:
            for shard in open_shards.values():
                shard.close()

    def _worker_ids(self, worker: int, num_workers: int, endless: bool) -> Iterator[tuple[int, int]]:
        """(epoch, sample id) of the blocks this worker reads: blocks counted from the current position on,
        across epochs when ``endless``, dealt to the workers in turn."""
        epoch, start = self.position.epoch, self.position.consumed
        if not endless:
            for sample_id in self.plan.worker_stream(epoch, start, worker, num_workers):
                yield epoch, sample_id
            return
        counted = 0
        while True:
            for position, sample_id in enumerate(self.plan.stream(epoch)):
                if position < start:
                    continue
                if (counted // self.plan.block_size) % num_workers == worker:
                    yield epoch, sample_id
                counted += 1
            epoch, start = epoch + 1, 0

    def _read(self, sample_id: int, open_shards: "OrderedDict[int, OpenShard]", epoch: int,
              notes: list[str]) -> PromptPair:
        try:
            return self._read_one(sample_id, open_shards)
        except ShardError as e:
            if self.on_corrupt == "fail":
                raise
            self._note_bad(e, notes)
        for candidate in self.plan.replacements(epoch, sample_id, self._unopenable):
            try:
                pair = self._read_one(candidate, open_shards)
            except ShardError as e:
                self._note_bad(e, notes)
                continue
            self.replaced += 1
            return pair
        raise ShardError(f"{self.shard_dir}: no readable sample left (bad shards: {', '.join(sorted(self.bad_shards))})")

    def _note_bad(self, error: ShardError, notes: list[str]) -> None:
        text = str(error)
        if text not in self.bad_shards:
            self.bad_shards.add(text)
            notes.append(text)

    def _read_one(self, sample_id: int, open_shards: "OrderedDict[int, OpenShard]") -> PromptPair:
        s, i = self.plan.shard_of(sample_id)
        shard = open_shards.get(s)
        if shard is None:
            if s in self._unopenable:
                raise ShardError(self._unopenable[s])
            try:
                shard = OpenShard(self.shard_dir / self.names[s], self.counts[s], self.sizes[s], self.offsets[s])
            except ShardError as e:
                self._unopenable[s] = str(e)
                raise
            open_shards[s] = shard
            if len(open_shards) > self.max_open_shards:
                open_shards.popitem(last=False)[1].close()
        else:
            open_shards.move_to_end(s)
        pair = shard.read(i, self.decode_tokens)
        if self.expect_tokens is not None:
            check_stored_tokens(pair, f"{shard.path}: sample #{i} (pair id {pair.id})", *self.expect_tokens)
        return pair


@dataclass
class _Failure:
    """A project error raised in a DataLoader worker, carried to the main process as one line."""

    kind: type
    message: str


class _Annotated(IterableDataset):
    """The dataset's (pair, notes) items; a project error becomes a ``_Failure`` item instead of a worker traceback."""

    def __init__(self, dataset: ShardDataset, endless: bool):
        self.dataset, self.endless = dataset, endless

    def __iter__(self):
        try:
            yield from self.dataset.items(self.endless)
        except EarDistError as e:
            yield _Failure(type(e), str(e))


def _collate_pairs(batch: list) -> list:
    return batch


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes; the rank's cores belong to the model


class ShardLoader:
    """Batches of pairs for one rank, with a position that a checkpoint saves.

    Iterating yields one epoch from the current position (list[PromptPair] batches), or
    with ``endless`` every epoch after it too, from one set of DataLoader workers (a
    training run: no worker start-up at each epoch). The position advances as batches
    are handed out (not as workers prefetch them), and moves to the next epoch when one
    ends. ``state_dict()`` after a batch is processed + ``load_state_dict()`` in a new
    process continue with the next sample. ``replaced`` counts samples that stood in for
    unreadable ones (``on_corrupt=skip``).
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, prefetch_factor: int = 2, endless: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.endless = endless
        self.replaced = 0
        self._seen_notes: set[str] = set()

    def state_dict(self) -> dict:
        """The rank's position after the batches handed out so far."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position saved by ``state_dict``."""
        self.dataset.load_state_dict(state)

    def _roll_over(self) -> None:
        """An exact epoch fully consumed: the position moves to the next epoch's start."""
        position, plan = self.dataset.position, self.dataset.plan
        while plan.mode == "exact" and position.consumed >= plan.samples_per_rank():
            self.dataset.position = position = ShardPosition(position.epoch + 1,
                                                             position.consumed - plan.samples_per_rank())

    def __iter__(self) -> Iterator[list[PromptPair]]:
        if self.endless:
            self._roll_over()  # before the workers copy the position
        # batches of exactly one block each: see plan.py for why the stream then keeps its order
        loader = DataLoader(
            _Annotated(self.dataset, self.endless),
            batch_size=self.dataset.plan.block_size,
            num_workers=self.num_workers,
            collate_fn=_collate_pairs,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            worker_init_fn=_one_thread if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            pairs = []
            for item in batch:
                if isinstance(item, _Failure):
                    raise item.kind(item.message)
                pair, notes, replaced = item
                self.replaced += replaced
                for note in notes:
                    if note not in self._seen_notes:
                        self._seen_notes.add(note)
                        log.warning("skipping unreadable data: %s", note)
                pairs.append(pair)
            self.dataset.position.consumed += len(batch)
            if self.endless:
                self._roll_over()
            yield pairs
        if self.dataset.plan.mode == "exact":
            self.dataset.set_epoch(self.dataset.position.epoch + 1)


def check_index_tokens(shard_dir: Union[str, Path], num_image_tokens: int, codebook_size: int) -> int:
    """Check every shard's recorded token ranges against a model before training; returns the unrecorded shards.

    A shard whose range does not fit is opened and its first sample that does not fit is
    named in the ``PairsError``. Shards written without ranges (older indexes, other
    tools) are counted and left to the check each sample gets as it is read.
    """
    shard_dir = Path(shard_dir)
    unrecorded = 0
    for entry in read_index(shard_dir)["shards"]:
        ranges = entry.get("tokens")
        if ranges is None:
            unrecorded += 1
            continue
        fits = all(r["min_len"] == r["max_len"] == num_image_tokens and r["min_id"] >= 0
                   and r["max_id"] < codebook_size for r in ranges.values() if r["samples"])
        if fits:
            continue
        path = shard_dir / entry["name"]
        shard = OpenShard(path, entry["samples"], entry.get("bytes"),
                          shard_dir / entry["offsets"] if entry.get("offsets") else None)
        try:
            for i in range(shard.num_samples):
                pair = shard.read(i)
                check_stored_tokens(pair, f"{path}: sample #{i} (pair id {pair.id})", num_image_tokens, codebook_size)
        finally:
            shard.close()
        raise ShardError(f"{path}: index.json records token ranges {ranges} that the samples do not have "
                         "(the index was rewritten?)")
    return unrecorded


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """This process's (rank, world size): given values, else torch.distributed, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_loader_from_config(
    cfg, block_size: int, rank: Optional[int] = None, world_size: Optional[int] = None, shard_dir: str = "",
    expect_tokens: Optional[tuple[int, int]] = None, endless: bool = False,
) -> ShardLoader:
    """The loader for ``cfg.data`` (shards at ``shard_dir`` or ``data.pairs``) of one rank.

    ``block_size`` is the rank's pairs per step; DataLoader workers come from ``data.num_workers``;
    ``expect_tokens`` and ``endless`` as in ``ShardDataset`` and ``ShardLoader``.
    """
    d = cfg.data
    rank, world_size = resolve_rank(rank, world_size)
    dataset = ShardDataset(
        shard_dir or d.pairs, rank=rank, world_size=world_size, mode=d.shards.mode, shuffle=d.shuffle,
        shuffle_buffer=d.shuffle_buffer, seed=d.shards.seed, block_size=block_size, drop_last=d.shards.drop_last,
        on_corrupt=d.shards.on_corrupt, expect_tokens=expect_tokens,
    )
    return ShardLoader(dataset, num_workers=d.num_workers, endless=endless)
