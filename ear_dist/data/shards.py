"""WebDataset tar shards of prompt pairs: writing, an index, and exact, resumable reading.

Layout of a shard directory::

    pairs-000000.tar           # samples "000000042.json" (+ ".surrogate_tokens.npy", ".target_tokens.npy")
    pairs-000000.tar.idx.npy   # where each sample's members lie (optional; readers walk the tar without it)
    pairs-000001.tar
    ...
    index.json                 # samples and bytes per shard, concept counts, config hash

Each shard is written under ``NAME.tar.tmp`` and renamed when complete, and the index
is written last, so a crashed build never leaves a shard that looks finished.

Reading (``ShardDataset``): the index's per-shard counts fix the order of an epoch
before any tar is opened, so every rank and every DataLoader worker computes the same
plan without talking to each other:

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
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ear_dist.data.pairs import PromptPair

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
# beside each shard: int64 [samples, 6] = (offset, size) of its json, surrogate_tokens.npy and
# target_tokens.npy members (-1 when absent), so readers need not walk the tar headers
OFFSETS_SUFFIX = ".idx.npy"
MEMBER_COLUMNS = ("json", "surrogate_tokens.npy", "target_tokens.npy")
INDEX_VERSION = 1
TOKEN_FIELDS = ("surrogate_tokens", "target_tokens")


class ShardError(RuntimeError):
    """A shard that cannot be read (truncated, corrupt, or disagreeing with the index)."""


# --------------------------------------------------------------------------- writing


def config_hash(config: dict) -> str:
    """A short, stable hash of the config that built the shards (sorted-key JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tar_size(payload_sizes: Iterable[int]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member, data padded to 512."""
    return sum(512 + 512 * math.ceil(n / 512) for n in payload_sizes)


def _file_size(member_bytes: int) -> int:
    """Size of a finished tar: members, two zero end blocks, padded to a 10 KiB record."""
    return tarfile.RECORDSIZE * math.ceil((member_bytes + 2 * tarfile.BLOCKSIZE) / tarfile.RECORDSIZE)


class ShardWriter:
    """Write pairs into count- and size-bounded WebDataset shards plus ``index.json``.

    A shard file stays within ``max_shard_bytes`` unless one sample alone is larger.

    Use as a context manager or call ``close()``; the index is written by ``close()``.
    """

    def __init__(
        self,
        out_dir: Union[str, Path],
        max_samples_per_shard: int = 10000,
        max_shard_bytes: int = 256 * 1024 * 1024,
        prefix: str = "pairs",
        config: Optional[dict] = None,
    ):
        import webdataset  # noqa: F401  (fail early with the real import error)

        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples_per_shard
        self.max_bytes = max_shard_bytes
        self.prefix = prefix
        self.config = config or {}
        self.shards: list[dict] = []
        self.concept_counts: Counter = Counter()
        self.total = 0
        self._file = None
        self._tar = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def _open(self) -> None:
        from webdataset import TarWriter

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._file = open(self.out_dir / (name + ".tmp"), "wb")
        # a fixed integer mtime: the same pairs give byte-identical shards, and no pax
        # header (a float mtime would add 1 KiB per member)
        self._tar = TarWriter(self._file, mtime=0, user="ear-dist", group="ear-dist")
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        self._tar.close()  # also closes the file object
        tmp = self.out_dir / (self._name + ".tmp")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # the member table first, so a renamed shard always has its table beside it
        offsets_name = self._name + OFFSETS_SUFFIX
        table = member_table(tmp)
        with open(self.out_dir / (offsets_name + ".tmp"), "wb") as f:
            np.save(f, table)
        os.replace(self.out_dir / (offsets_name + ".tmp"), self.out_dir / offsets_name)
        os.replace(tmp, self.out_dir / self._name)
        self.shards.append({
            "name": self._name, "samples": self._count,
            "bytes": (self.out_dir / self._name).stat().st_size, "offsets": offsets_name,
        })
        self._tar = None
        self._file = None

    def _abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
            self._tar = None

    def write(self, pair: PromptPair) -> None:
        """Append one pair; starts a new shard when the count or size bound would be passed."""
        record = pair.to_dict()
        sample = {"__key__": f"{self.total:09d}"}
        for name in TOKEN_FIELDS:
            tokens = record.pop(name, None)
            if tokens is not None:
                buf = io.BytesIO()
                np.save(buf, np.asarray(tokens, dtype=np.int32))
                sample[f"{name}.npy"] = buf.getvalue()
        sample["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
        size = _tar_size(len(v) for k, v in sample.items() if k != "__key__")
        if self._tar is not None and (
            self._count >= self.max_samples or (self._count > 0 and _file_size(self._bytes + size) > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes = self._tar.tarstream.offset  # exact, headers and padding included
        self.total += 1
        self.concept_counts[pair.concept] += 1

    def close(self) -> dict:
        """Finish the last shard and write the index atomically; returns the index."""
        if self._tar is not None:
            self._finish()
        index = {
            "version": INDEX_VERSION,
            "total_samples": self.total,
            "shards": self.shards,
            "concept_counts": dict(sorted(self.concept_counts.items())),
            "config_hash": config_hash(self.config),
            "config": self.config,
        }
        tmp = self.out_dir / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.out_dir / INDEX_NAME)
        return index


def write_shards(pairs: Iterable[PromptPair], out_dir: Union[str, Path], **kwargs) -> dict:
    """Write all ``pairs`` with a ``ShardWriter``; returns the index."""
    with ShardWriter(out_dir, **kwargs) as writer:
        for pair in pairs:
            writer.write(pair)
    return writer.close()


def read_index(shard_dir: Union[str, Path]) -> dict:
    """Load and check ``index.json``; errors name the file and the field."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path}: no index; build shards with `ear-dist data build`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: invalid JSON: {e}") from None
    for key in ("version", "total_samples", "shards"):
        if key not in index:
            raise ShardError(f"{path}: field '{key}' is missing")
    if index["version"] != INDEX_VERSION:
        raise ShardError(f"{path}: version {index['version']} is not {INDEX_VERSION}")
    for i, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict) or not isinstance(shard.get("samples"), int) or "name" not in shard:
            raise ShardError(f"{path}: shards[{i}]: expected {{name, samples}}")
    return index


# --------------------------------------------------------------------------- reading one shard


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _scan_tar(buf, path: Path) -> Optional[list[tuple[str, int, int]]]:
    """(name, data offset, size) of each regular member, parsing ustar headers directly.

    Several times faster than ``tarfile`` on shards of small members: one Python step
    per header, then every header checksum verified at once with numpy. Returns None
    for what only ``tarfile`` handles (pax or GNU long names, base-256 sizes), so any
    valid tar still reads.
    """
    members = []
    header_positions = []
    pos, end = 0, len(buf)
    while True:
        if pos + 512 > end:
            raise ShardError(f"{path}: truncated: no end-of-archive block after byte {pos}")
        if buf[pos] == 0 and buf[pos : pos + 512] == _ZERO_BLOCK:
            break
        header_positions.append(pos)
        typeflag = buf[pos + 156 : pos + 157]
        size_field = buf[pos + 124 : pos + 136]
        if size_field[0] & 0x80 or typeflag not in (b"0", b"\0", b"5"):
            return None
        try:
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{path}: corrupt tar header at byte {pos} (size field {size_field!r})") from None
        if typeflag != b"5":
            name = buf[pos : pos + 100].split(b"\0", 1)[0]
            prefix = buf[pos + 345 : pos + 500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
            if pos + 512 + size > end:
                raise ShardError(f"{path}: truncated: member {name.decode('utf-8', 'replace')} runs past the end of the file")
            members.append((name.decode("utf-8", "replace"), pos + 512, size))
        pos += 512 + 512 * ((size + 511) // 512)
    _check_headers(buf, np.asarray(header_positions, dtype=np.int64), path)
    return members


def _scan_tar_slow(file, file_size: int, path: Path) -> list[tuple[str, int, int]]:
    members = []
    file.seek(0)
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.offset_data + member.size > file_size:
                raise ShardError(f"{path}: truncated: member {member.name} runs past the end of the file")
            members.append((member.name, member.offset_data, member.size))
    return members


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, int]] = {}


def _load_npy(data: bytes) -> np.ndarray:
    """``np.load`` for .npy bytes, with the header parse cached (all our token headers repeat)."""
    if data[:6] == b"\x93NUMPY" and data[6] == 1:
        header_end = 10 + int.from_bytes(data[8:10], "little")
        header = data[:header_end]
        known = _NPY_HEADERS.get(header)
        if known is None:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.dtype.hasobject or not array.flags.c_contiguous:
                return array
            _NPY_HEADERS[header] = known = (array.dtype, array.shape, header_end)
        dtype, shape, offset = known
        return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def member_table(path: Union[str, Path]) -> np.ndarray:
    """The offsets table of a shard (see ``OFFSETS_SUFFIX``), from walking its headers."""
    import mmap

    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        members = _scan_tar(buf, path)
        if members is None:
            members = _scan_tar_slow(f, os.fstat(f.fileno()).st_size, path)
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for name, offset, size in members:
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        groups.setdefault(key, {})[ext] = (offset, size)
    table = np.full((len(groups), 2 * len(MEMBER_COLUMNS)), -1, dtype=np.int64)
    for row, found in enumerate(groups.values()):
        for col, ext in enumerate(MEMBER_COLUMNS):
            if ext in found:
                table[row, 2 * col : 2 * col + 2] = found[ext]
    return table


def _octal_fields(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode NUL/space padded octal header fields [N, W] -> (values, well-formed mask)."""
    fields = fields.astype(np.int64)
    is_digit = (fields >= ord("0")) & (fields <= ord("7"))
    digits_after = np.cumsum(is_digit[:, ::-1], axis=1)[:, ::-1] - is_digit
    values = np.where(is_digit, (fields - ord("0")) * (8 ** digits_after), 0).sum(1)
    well_formed = is_digit.any(1) & np.all(is_digit | (fields == 0) | (fields == ord(" ")), axis=1)
    return values, well_formed


def _gather_headers(buf, header_positions: np.ndarray) -> np.ndarray:
    # a copy; the view of the map must not outlive this call (an exported buffer blocks mmap.close)
    raw = np.frombuffer(buf, dtype=np.uint8)
    return raw[header_positions[:, None] + np.arange(512)]


def _check_headers(buf, header_positions: np.ndarray, path: Path, sizes: Optional[np.ndarray] = None) -> None:
    """Verify the checksum (and, given ``sizes``, the size field) of tar headers, all at once."""
    if len(header_positions) == 0:
        return
    headers = _gather_headers(buf, header_positions)
    computed = headers[:, :148].sum(1, dtype=np.int64) + headers[:, 156:].sum(1, dtype=np.int64) + 8 * 32
    stored, well_formed = _octal_fields(headers[:, 148:156])
    bad = ~well_formed | (stored != computed)
    if sizes is not None:
        size_values, size_ok = _octal_fields(headers[:, 124:136])
        bad |= ~size_ok | (size_values != sizes)
    where = np.nonzero(bad)[0]
    if len(where):
        raise ShardError(f"{path}: corrupt tar header at byte {int(header_positions[where[0]])} (checksum or size mismatch)")


class _OpenShard:
    """One tar (memory-mapped) and where each sample's members lie; reads a sample by index.

    With the offsets table written beside the shard, opening costs one vectorized
    header check; without it (shards from other tools) the headers are walked.
    """

    def __init__(self, path: Path, expected_samples: int, expected_bytes: Optional[int] = None,
                 offsets_path: Optional[Path] = None):
        import mmap

        self.path = path
        try:
            self.file = open(path, "rb")
        except OSError as e:
            raise ShardError(f"{path}: cannot open: {e.strerror}") from None
        self.map = None
        try:
            file_size = os.fstat(self.file.fileno()).st_size
            if expected_bytes is not None and file_size != expected_bytes:
                raise ShardError(
                    f"{path}: is {file_size} bytes, the index says {expected_bytes} (truncated or rewritten)"
                )
            if file_size == 0:
                raise ShardError(f"{path}: empty file")
            self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
            self.table = self._load_table(offsets_path, expected_samples, file_size)
            if self.table is None:
                self.table = member_table(path)
        except tarfile.TarError as e:
            self.close()
            raise ShardError(f"{path}: corrupt or truncated tar: {e}") from None
        except ShardError:
            self.close()
            raise
        self.num_samples = len(self.table)
        if self.num_samples != expected_samples:
            self.close()
            raise ShardError(
                f"{path}: holds {self.num_samples} samples, the index says {expected_samples} "
                "(truncated or rewritten after the index)"
            )

    def _load_table(self, offsets_path: Optional[Path], expected_samples: int, file_size: int) -> Optional[np.ndarray]:
        """The offsets table if present and consistent with the tar's headers, else None."""
        if offsets_path is None or not offsets_path.is_file():
            return None
        try:
            table = np.load(offsets_path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            log.warning("%s: unreadable offsets table; walking the tar headers instead", offsets_path)
            return None
        if table.ndim != 2 or table.shape != (expected_samples, 2 * len(MEMBER_COLUMNS)):
            return None
        offsets, sizes = table[:, 0::2].reshape(-1), table[:, 1::2].reshape(-1)
        present = offsets >= 0
        offsets, sizes = offsets[present], sizes[present]
        if len(offsets) and (offsets.min() < 512 or (offsets + sizes).max() > file_size):
            raise ShardError(f"{self.path}: member offsets run past the end of the file (truncated?)")
        _check_headers(self.map, offsets - 512, self.path, sizes)
        return table

    def members(self, i: int) -> list[tuple[str, int, int]]:
        row = self.table[i].tolist()
        return [(ext, row[2 * c], row[2 * c + 1]) for c, ext in enumerate(MEMBER_COLUMNS) if row[2 * c] >= 0]

    def read(self, i: int, decode_tokens: bool = True) -> PromptPair:
        key, members = f"#{i}", self.members(i)
        record = None
        tokens = {}
        for ext, offset, size in members:
            if ext != "json" and not decode_tokens:
                continue
            data = self.map[offset : offset + size]
            if ext == "json":
                try:
                    record = json.loads(data.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ShardError(f"{self.path}: sample {key}: json: {e}") from None
            elif ext.endswith(".npy") and ext[:-4] in TOKEN_FIELDS:
                try:
                    tokens[ext[:-4]] = _load_npy(data)
                except (ValueError, EOFError) as e:
                    raise ShardError(f"{self.path}: sample {key}: {ext}: {e}") from None
        if record is None:
            raise ShardError(f"{self.path}: sample {key}: no .json member")
        pair = None
        if type(record) is dict and type(record.get("target")) is str and record["target"]:
            # records this package wrote: build directly (checking each field costs more than the rest of a read)
            try:
                pair = PromptPair(**record)
            except TypeError:
                pair = None
        if pair is None:
            try:
                pair = PromptPair.from_dict(record, where=f"{self.path}: sample {key}")
            except ValueError as e:
                raise ShardError(str(e)) from None
        # token ids stay numpy arrays here: converting 576 ids to a list per sample is slow
        pair.surrogate_tokens = tokens.get("surrogate_tokens")
        pair.target_tokens = tokens.get("target_tokens")
        return pair

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        self.file.close()


# --------------------------------------------------------------------------- the epoch plan


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


class ShardDataset(IterableDataset):
    """The pairs of a shard directory as an IterableDataset, split by rank and worker.

    ``mode``: ``exact`` (each epoch every rank gets the same number of samples) or
    ``resampled`` (shards drawn with replacement; an endless epoch).
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
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be exact or resampled, got {mode!r}")
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"on_corrupt must be fail or skip, got {on_corrupt!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        self.counts = [s["samples"] for s in self.index["shards"]]
        self.names = [s["name"] for s in self.index["shards"]]
        self.sizes = [s.get("bytes") for s in self.index["shards"]]
        self.offsets = [self.shard_dir / s["offsets"] if s.get("offsets") else None for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._starts_list = self.starts.tolist()
        self.total = int(self.starts[-1])
        if self.total == 0:
            raise ShardError(f"{self.shard_dir}: the index lists no samples")
        self.rank, self.world_size = rank, world_size
        self.mode, self.shuffle, self.shuffle_buffer = mode, shuffle, shuffle_buffer
        self.seed, self.block_size, self.drop_last = seed, block_size, drop_last
        self.on_corrupt, self.decode_tokens = on_corrupt, decode_tokens
        self.max_open_shards = max_open_shards
        if drop_last and self.total < world_size:
            raise ShardError(f"{self.shard_dir}: {self.total} samples cannot give each of {world_size} ranks one")
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

    def samples_per_rank(self) -> int:
        """Samples each rank sees per epoch in exact mode (the same on every rank)."""
        if self.drop_last:
            return self.total // self.world_size
        return math.ceil(self.total / self.world_size)

    def __len__(self) -> int:
        if self.mode == "resampled":
            raise TypeError("a resampled ShardDataset has no length (its epoch is endless)")
        return self.samples_per_rank()

    def _global_order(self, epoch: int) -> np.ndarray:
        shard_order = list(range(len(self.counts)))
        if self.shuffle:
            _rng(self.seed, epoch, -1).shuffle(shard_order)
        return np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shard_order])

    def rank_plan(self, epoch: int) -> Iterator[int]:
        """Global sample ids this rank reads in ``epoch``, in stream order."""
        if self.mode == "resampled":
            return self._resampled_plan(epoch)
        order = self._global_order(epoch)
        quota = self.samples_per_rank()
        positions = (np.arange(quota) + self.rank * quota) % self.total  # padding wraps to the start
        ids = order[positions].tolist()
        if self.shuffle:
            return buffer_shuffle(ids, self.shuffle_buffer, _rng(self.seed, epoch, self.rank))
        return iter(ids)

    def _resampled_plan(self, epoch: int) -> Iterator[int]:
        shard_rng = _rng(self.seed, epoch, self.rank, 1)

        def draws():
            while True:
                s = shard_rng.randrange(len(self.counts))
                yield from range(int(self.starts[s]), int(self.starts[s + 1]))

        if self.shuffle:
            return buffer_shuffle(draws(), self.shuffle_buffer, _rng(self.seed, epoch, self.rank, 2))
        return draws()

    # -- iteration
    def __iter__(self) -> Iterator[PromptPair]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.position.epoch, self.position.consumed
        open_shards: "OrderedDict[int, _OpenShard]" = OrderedDict()
        plan = self.rank_plan(epoch)
        try:
            for position, sample_id in enumerate(plan):
                if position < start:
                    continue
                if ((position - start) // self.block_size) % num_workers != worker:
                    continue
                yield self._read(sample_id, open_shards, epoch)
        finally:
            for shard in open_shards.values():
                shard.close()

    def _shard_of(self, sample_id: int) -> tuple[int, int]:
        s = bisect.bisect_right(self._starts_list, sample_id) - 1
        return s, sample_id - self._starts_list[s]

    def _read(self, sample_id: int, open_shards: "OrderedDict[int, _OpenShard]", epoch: int) -> PromptPair:
        try:
            return self._read_one(sample_id, open_shards)
        except ShardError as e:
            if self.on_corrupt == "fail":
                raise
            self._note_bad(e)
        # skip: the next readable sample of the same epoch order takes its place
        order = self._global_order(epoch)
        where = int(np.nonzero(order == sample_id)[0][0])
        for step in range(1, self.total):
            candidate = int(order[(where + step) % self.total])
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

    def _read_one(self, sample_id: int, open_shards: "OrderedDict[int, _OpenShard]") -> PromptPair:
        s, i = self._shard_of(sample_id)
        shard = open_shards.get(s)
        if shard is None:
            shard = _OpenShard(self.shard_dir / self.names[s], self.counts[s], self.sizes[s], self.offsets[s])
            open_shards[s] = shard
            if len(open_shards) > self.max_open_shards:
                open_shards.popitem(last=False)[1].close()
        else:
            open_shards.move_to_end(s)
        return shard.read(i, self.decode_tokens)


# --------------------------------------------------------------------------- the loader


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
        loader = DataLoader(
            self.dataset,
            batch_size=self.dataset.block_size,
            num_workers=self.num_workers,
            collate_fn=_collate_pairs,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            self.dataset.position.consumed += len(batch)
            yield batch
        if self.dataset.mode == "exact":
            self.dataset.set_epoch(self.dataset.position.epoch + 1)


def verify_shards(shard_dir: Union[str, Path]) -> list[str]:
    """Open and read every sample of every shard; returns one message per bad shard."""
    root = Path(shard_dir)
    problems = []
    for shard in read_index(root)["shards"]:
        try:
            offsets = root / shard["offsets"] if shard.get("offsets") else None
            opened = _OpenShard(root / shard["name"], shard["samples"], shard.get("bytes"), offsets)
            try:
                for i in range(opened.num_samples):
                    opened.read(i)
            finally:
                opened.close()
        except ShardError as e:
            problems.append(str(e))
    return problems


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
