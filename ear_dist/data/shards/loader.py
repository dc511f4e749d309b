"""Reading a shard directory for training: ``ShardDataset`` reads an ``EpochPlan`` through
open shards, ``ShardLoader`` batches it and keeps the position a checkpoint saves.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Union

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ear_dist.data.pairs import PromptPair
from ear_dist.data.shards.index import ShardError, read_index
from ear_dist.data.shards.plan import EpochPlan, ShardPosition, check_plan_settings
from ear_dist.data.shards.tar import OpenShard

log = logging.getLogger(__name__)


class ShardDataset(IterableDataset):
    """The pairs of a shard directory as an IterableDataset, split by rank and worker.

    ``mode``: ``exact`` (each epoch every rank gets the same number of samples) or
    ``resampled`` (shards drawn with replacement; an endless epoch); ``self.plan`` (an
    ``EpochPlan``) decides which samples, in which order.
    ``on_corrupt``: ``fail`` raises ``ShardError`` naming the shard; ``skip`` logs it
    and serves the next readable sample of the rank in its place, so ranks keep equal
    counts (``self.replaced`` counts these in the worker that did it).
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
        self.position = ShardPosition()
        self.replaced = 0
        self.bad_shards: set[str] = set()

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
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.position.epoch, self.position.consumed
        open_shards: "OrderedDict[int, OpenShard]" = OrderedDict()
        try:
            for sample_id in self.plan.worker_stream(epoch, start, worker, num_workers):
                yield self._read(sample_id, open_shards, epoch)
        finally:
            for shard in open_shards.values():
                shard.close()

    def _read(self, sample_id: int, open_shards: "OrderedDict[int, OpenShard]", epoch: int) -> PromptPair:
        try:
            return self._read_one(sample_id, open_shards)
        except ShardError as e:
            if self.on_corrupt == "fail":
                raise
            self._note_bad(e)
        for candidate in self.plan.replacements(epoch, sample_id):
            try:
                pair = self._read_one(candidate, open_shards)
            except ShardError as e:
                self._note_bad(e)
                continue
            self.replaced += 1
            return pair
        raise ShardError(f"{self.shard_dir}: no readable sample left (bad shards: {', '.join(sorted(self.bad_shards))})")

    def _note_bad(self, error: ShardError) -> None:
        text = str(error)
        if text not in self.bad_shards:
            self.bad_shards.add(text)
            log.warning("skipping unreadable data: %s", text)

    def _read_one(self, sample_id: int, open_shards: "OrderedDict[int, OpenShard]") -> PromptPair:
        s, i = self.plan.shard_of(sample_id)
        shard = open_shards.get(s)
        if shard is None:
            shard = OpenShard(self.shard_dir / self.names[s], self.counts[s], self.sizes[s], self.offsets[s])
            open_shards[s] = shard
            if len(open_shards) > self.max_open_shards:
                open_shards.popitem(last=False)[1].close()
        else:
            open_shards.move_to_end(s)
        return shard.read(i, self.decode_tokens)


def _collate_pairs(batch: list) -> list:
    return batch


class ShardLoader:
    """Batches of pairs for one rank, with a position that a checkpoint saves.

    Iterating yields one epoch from the current position (list[PromptPair] batches);
    the position advances as batches are handed out, and the next epoch starts when
    one ends. ``state_dict()`` after a batch is processed + ``load_state_dict()`` in a
    new process continue with the next sample.
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, prefetch_factor: int = 2):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor

    def state_dict(self) -> dict:
        """The rank's position after the batches handed out so far."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position saved by ``state_dict``."""
        self.dataset.load_state_dict(state)

    def __iter__(self) -> Iterator[list[PromptPair]]:
        # batches of exactly one block each: see plan.py for why the stream then keeps its order
        loader = DataLoader(
            self.dataset,
            batch_size=self.dataset.plan.block_size,
            num_workers=self.num_workers,
            collate_fn=_collate_pairs,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            self.dataset.position.consumed += len(batch)
            yield batch
        if self.dataset.plan.mode == "exact":
            self.dataset.set_epoch(self.dataset.position.epoch + 1)


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
) -> ShardLoader:
    """The training loader for ``cfg.data`` (shards at ``shard_dir`` or ``data.pairs``).

    ``block_size`` is the per-rank batch size; DataLoader workers come from ``data.num_workers``.
    """
    d = cfg.data
    rank, world_size = resolve_rank(rank, world_size)
    dataset = ShardDataset(
        shard_dir or d.pairs, rank=rank, world_size=world_size, mode=d.shards.mode, shuffle=d.shuffle,
        shuffle_buffer=d.shuffle_buffer, seed=d.shards.seed, block_size=block_size, drop_last=d.shards.drop_last,
        on_corrupt=d.shards.on_corrupt,
    )
    return ShardLoader(dataset, num_workers=d.num_workers)
