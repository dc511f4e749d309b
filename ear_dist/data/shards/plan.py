"""The epoch plan: which sample each rank and DataLoader worker reads, in which order.

The index's per-shard counts fix the order of an epoch before any tar is opened, so
every rank and every DataLoader worker computes the same plan without talking to each
other:

1. the epoch's shard order (a seeded permutation, the same on all ranks);
2. each rank's contiguous slice of that sequence, all of equal length (exact mode:
   ``ceil(N / world)`` samples, the last slices wrapping around to the start, or
   ``floor(N / world)`` with ``drop_last``), so no rank runs out early and hangs the rest;
3. a seeded shuffle buffer over the rank's slice;
4. blocks of ``block_size`` consecutive positions dealt to workers round-robin. A
   DataLoader with ``batch_size == block_size`` fetches batches from its workers
   round-robin too, so the stream a rank sees is the position order itself, whatever
   the number of workers.

Hence the position of a rank is just ``(epoch, samples consumed)``: a resume re-plans
the epoch and starts at the next position, repeating and losing nothing. The
resampled mode draws shards with replacement from a seeded stream (infinite epoch).

``EpochPlan`` is pure: sample counts and settings in, global sample ids out. Sample ids
number the samples of the shard directory in index order (shard 0 first).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

MODES = ("exact", "resampled")


def check_plan_settings(mode: str, rank: int, world_size: int, block_size: int) -> None:
    """Raise ``ValueError`` naming the first setting an ``EpochPlan`` cannot use."""
    if mode not in MODES:
        raise ValueError(f"mode must be exact or resampled, got {mode!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _rng(*parts: int) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little"))


def buffer_shuffle(items: Iterable[int], buffer_size: int, rng: random.Random) -> Iterator[int]:
    """A streaming shuffle with a bounded buffer (what WebDataset's shuffle does), seeded."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[int] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


@dataclass
class ShardPosition:
    """Where a rank is: the epoch and the samples it has consumed in that epoch."""

    epoch: int = 0
    consumed: int = 0


class EpochPlan:
    """The sample ids one rank reads each epoch, and how its DataLoader workers share them.

    ``counts``: samples per shard, in index order. ``mode``: ``exact`` (each epoch every
    rank gets ``samples_per_rank()`` samples) or ``resampled`` (shards drawn with
    replacement; an endless epoch). ``drop_last`` (exact mode): drop the remainder
    instead of wrapping around to the start of the epoch.
    """

    def __init__(
        self,
        counts: Sequence[int],
        rank: int = 0,
        world_size: int = 1,
        mode: str = "exact",
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        block_size: int = 1,
        drop_last: bool = False,
    ):
        check_plan_settings(mode, rank, world_size, block_size)
        self.counts = list(counts)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._starts_list = self.starts.tolist()
        self.total = int(self.starts[-1])
        if self.total == 0:
            raise ValueError("no samples to plan")
        if drop_last and self.total < world_size:
            raise ValueError(f"{self.total} samples cannot give each of {world_size} ranks one")
        self.rank, self.world_size = rank, world_size
        self.mode, self.shuffle, self.shuffle_buffer = mode, shuffle, shuffle_buffer
        self.seed, self.block_size, self.drop_last = seed, block_size, drop_last

    def samples_per_rank(self) -> int:
        """Samples each rank sees per epoch in exact mode (the same on every rank)."""
        if self.drop_last:
            return self.total // self.world_size
        return math.ceil(self.total / self.world_size)

    def global_order(self, epoch: int) -> np.ndarray:
        """All sample ids of ``epoch``, shard by shard in the epoch's shard order (the same on every rank)."""
        shard_order = list(range(len(self.counts)))
        if self.shuffle:
            _rng(self.seed, epoch, -1).shuffle(shard_order)
        return np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shard_order])

    def stream(self, epoch: int) -> Iterator[int]:
        """Sample ids this rank reads in ``epoch``, in position order (endless when resampled)."""
        if self.mode == "resampled":
            return self._resampled_stream(epoch)
        order = self.global_order(epoch)
        quota = self.samples_per_rank()
        positions = (np.arange(quota) + self.rank * quota) % self.total  # padding wraps to the start
        ids = order[positions].tolist()
        if self.shuffle:
            return buffer_shuffle(ids, self.shuffle_buffer, _rng(self.seed, epoch, self.rank))
        return iter(ids)

    def _resampled_stream(self, epoch: int) -> Iterator[int]:
        shard_rng = _rng(self.seed, epoch, self.rank, 1)

        def draws():
            while True:
                s = shard_rng.randrange(len(self.counts))
                yield from range(int(self.starts[s]), int(self.starts[s + 1]))

        if self.shuffle:
            return buffer_shuffle(draws(), self.shuffle_buffer, _rng(self.seed, epoch, self.rank, 2))
        return draws()

    def worker_stream(self, epoch: int, start: int = 0, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The sample ids ``worker`` of ``num_workers`` reads from position ``start`` of ``epoch`` on.

        Blocks of ``block_size`` positions go to the workers in turn, starting with worker 0
        at ``start``; taking one block from each worker in turn gives back ``stream(epoch)``.
        """
        for position, sample_id in enumerate(self.stream(epoch)):
            if position < start:
                continue
            if ((position - start) // self.block_size) % num_workers != worker:
                continue
            yield sample_id

    def shard_of(self, sample_id: int) -> tuple[int, int]:
        """(shard, sample within that shard) of a sample id."""
        s = bisect.bisect_right(self._starts_list, sample_id) - 1
        return s, sample_id - self._starts_list[s]

    def replacements(self, epoch: int, sample_id: int) -> Iterator[int]:
        """The other samples of ``epoch`` in its global order, from the one after ``sample_id`` on, wrapping.

        An unreadable sample is replaced by the first readable one of these, the same
        choice on every rank and worker.
        """
        order = self.global_order(epoch)
        where = int(np.nonzero(order == sample_id)[0][0])
        for step in range(1, self.total):
            yield int(order[(where + step) % self.total])
