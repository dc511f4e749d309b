"""The epoch plan: which sample each rank and DataLoader worker reads, in which order.

The index's per-shard counts fix the order of an epoch before any tar is opened, so
every rank and every DataLoader worker computes the same plan without talking to each
other:

1. the epoch's global order: the shards in a seeded order, then one seeded shuffle
   buffer over their samples (both the same on every rank). In exact mode the epoch is
   padded by wrapping around to its start (or cut, with ``drop_last``) to whole rounds
   of ``block_size * world_size`` positions, so every rank gets as many samples and
   none runs out early and hangs the rest;
2. that sequence dealt in blocks of ``block_size`` positions to the ranks in turn:
   rank r takes blocks r, r + W, r + 2W, ... With ``block_size`` = a rank's pairs per
   step, round k is the global batch of step k and rank r's block is its contiguous
   slice of it, so the samples of step k do not depend on how many ranks share them;
3. a rank's blocks dealt to its DataLoader workers in turn. A DataLoader with
   ``batch_size == block_size`` fetches batches from its workers round-robin too, so
   the stream a rank sees is the position order itself, whatever the number of workers.

Hence the position of a rank is just ``(epoch, samples consumed)``: a resume re-plans
the epoch and starts at the next position, repeating and losing nothing. The
resampled mode draws shards with replacement from a seeded stream (an endless epoch).
Every sequence is generated lazily: a rank holds the shard counts and one shuffle
buffer, never a list of the epoch's samples, so memory does not grow with the data.

``EpochPlan`` is pure: sample counts and settings in, global sample ids out. Sample ids
number the samples of the shard directory in index order (shard 0 first).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Container, Iterable, Iterator, Sequence

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
    replacement; an endless epoch). ``block_size``: consecutive positions a rank takes at
    a time. ``drop_last`` (exact mode): cut the epoch's last partial round instead of
    wrapping around to its start.
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
        self.round = block_size * world_size  # positions per round: one block for each rank
        if drop_last and mode == "exact" and self.total < self.round:
            what = "one" if block_size == 1 else f"a block of {block_size}"
            raise ValueError(f"{self.total} samples cannot give each of {world_size} ranks {what}")
        self.rank, self.world_size = rank, world_size
        self.mode, self.shuffle, self.shuffle_buffer = mode, shuffle, shuffle_buffer
        self.seed, self.block_size, self.drop_last = seed, block_size, drop_last

    def rounds(self) -> int:
        """Rounds of one block per rank in an exact epoch."""
        return self.total // self.round if self.drop_last else math.ceil(self.total / self.round)

    def samples_per_rank(self) -> int:
        """Samples each rank sees per epoch in exact mode (the same on every rank)."""
        return self.rounds() * self.block_size

    def shard_order(self, epoch: int) -> list[int]:
        """The shards in the order ``epoch`` visits them (the same on every rank)."""
        order = list(range(len(self.counts)))
        if self.shuffle:
            _rng(self.seed, epoch, -1).shuffle(order)
        return order

    def ordered_ids(self, epoch: int) -> Iterator[int]:
        """All sample ids of ``epoch``, shard by shard in the epoch's shard order, before the shuffle buffer."""
        for s in self.shard_order(epoch):
            yield from range(self._starts_list[s], self._starts_list[s + 1])

    def global_stream(self, epoch: int) -> Iterator[int]:
        """The sample ids of every position of ``epoch``, before they are dealt to ranks (endless when resampled)."""
        if self.mode == "resampled":
            shard_rng = _rng(self.seed, epoch, 1)

            def draws():
                while True:
                    s = shard_rng.randrange(len(self.counts))
                    yield from range(self._starts_list[s], self._starts_list[s + 1])

            ids: Iterable[int] = draws()
        else:
            def padded():  # wraps around to the start of the order for the last round's fill
                while True:
                    yield from self.ordered_ids(epoch)

            ids = itertools.islice(padded(), self.rounds() * self.round)
        if self.shuffle:
            return buffer_shuffle(ids, self.shuffle_buffer, _rng(self.seed, epoch, 2))
        return iter(ids)

    def stream(self, epoch: int) -> Iterator[int]:
        """Sample ids this rank reads in ``epoch``, in position order (endless when resampled)."""
        lo, hi = self.rank * self.block_size, (self.rank + 1) * self.block_size
        for position, sample_id in enumerate(self.global_stream(epoch)):
            if lo <= position % self.round < hi:
                yield sample_id

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

    def replacements(self, epoch: int, sample_id: int, skip_shards: Container[int] = ()) -> Iterator[int]:
        """The other samples of ``epoch`` in its shard order, from the one after ``sample_id`` on, wrapping.

        An unreadable sample is replaced by the first readable one of these, the same
        choice on every rank and worker. Shards in ``skip_shards`` (known unreadable) are
        passed over whole.
        """
        order = self.shard_order(epoch)
        own, _ = self.shard_of(sample_id)
        at = order.index(own)
        starts = self._starts_list
        own_ok = own not in skip_shards
        if own_ok:
            yield from range(sample_id + 1, starts[own + 1])
        for s in order[at + 1:] + order[:at]:
            if s not in skip_shards:
                yield from range(starts[s], starts[s + 1])
        if own_ok:
            yield from range(starts[own], sample_id)
