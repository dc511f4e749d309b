"""Writing shards: pairs into count- and size-bounded WebDataset tars, each with its offsets table.

Each shard is written under ``NAME.tar.tmp`` and renamed when complete, and the index
is written last, so a crashed build never leaves a shard that looks finished; a write
that fails (a full disk, a file size limit) removes the shard in progress and raises
``StorageError`` naming it. Each shard's index entry records the range of its stored
token counts and ids, so a run can check them against its model before it starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ear_dist.data.pairs import PromptPair
from ear_dist.data.shards.index import INDEX_NAME, INDEX_VERSION, OFFSETS_SUFFIX, TOKEN_FIELDS
from ear_dist.data.shards.tar import member_table
from ear_dist.errors import storage_error
from ear_dist.storage import write_text_atomic


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

    def _guarded(self, path: Path, action):
        """Run a write; an OSError removes the shard in progress and becomes a StorageError naming ``path``."""
        try:
            return action()
        except OSError as e:
            self._abort()
            raise storage_error(path, e) from None

    def _open(self) -> None:
        from webdataset import TarWriter

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._file = self._guarded(self.out_dir / name, lambda: open(self.out_dir / (name + ".tmp"), "wb"))
        # a fixed integer mtime: the same pairs give byte-identical shards, and no pax
        # header (a float mtime would add 1 KiB per member)
        self._tar = TarWriter(self._file, mtime=0, user="ear-dist", group="ear-dist")
        self._count = 0
        self._bytes = 0
        self._tokens: dict[str, list[int]] = {}

    def _finish(self) -> None:
        self._guarded(self.out_dir / self._name, self._finish_files)
        entry = {"name": self._name, "samples": self._count,
                 "bytes": (self.out_dir / self._name).stat().st_size, "offsets": self._name + OFFSETS_SUFFIX}
        if self._tokens:
            entry["tokens"] = {name: dict(zip(("samples", "min_len", "max_len", "min_id", "max_id"), stats))
                               for name, stats in self._tokens.items()}
        self.shards.append(entry)
        self._tar = None
        self._file = None

    def _finish_files(self) -> None:
        self._tar.close()  # also closes the file object
        tmp = self.out_dir / (self._name + ".tmp")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # the member table first, so a renamed shard always has its table beside it
        offsets_name = self._name + OFFSETS_SUFFIX
        table = member_table(tmp)
        try:
            with open(self.out_dir / (offsets_name + ".tmp"), "wb") as f:
                np.save(f, table)
        except OSError:
            (self.out_dir / (offsets_name + ".tmp")).unlink(missing_ok=True)
            raise
        os.replace(self.out_dir / (offsets_name + ".tmp"), self.out_dir / offsets_name)
        os.replace(tmp, self.out_dir / self._name)

    def _abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except OSError:
                pass  # the shard in progress is removed either way
            finally:
                (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
            self._tar = None

    def write(self, pair: PromptPair) -> None:
        """Append one pair; starts a new shard when the count or size bound would be passed."""
        record = pair.to_dict(tokens=False)  # tokens go into .npy members, without a detour through lists
        sample = {"__key__": f"{self.total:09d}"}
        token_stats = {}
        for name in TOKEN_FIELDS:
            tokens = getattr(pair, name)
            if tokens is not None:
                ids = np.asarray(tokens, dtype=np.int32)
                buf = io.BytesIO()
                np.save(buf, ids)
                sample[f"{name}.npy"] = buf.getvalue()
                token_stats[name] = (len(ids), int(ids.min()) if len(ids) else 0, int(ids.max()) if len(ids) else 0)
        sample["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
        size = _tar_size(len(v) for k, v in sample.items() if k != "__key__")
        if self._tar is not None and (
            self._count >= self.max_samples or (self._count > 0 and _file_size(self._bytes + size) > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        self._guarded(self.out_dir / self._name, lambda: self._tar.write(sample))
        self._count += 1
        self._bytes = self._tar.tarstream.offset  # exact, headers and padding included
        for name, (length, low, high) in token_stats.items():
            stats = self._tokens.get(name)
            self._tokens[name] = [1, length, length, low, high] if stats is None else [
                stats[0] + 1, min(stats[1], length), max(stats[2], length), min(stats[3], low), max(stats[4], high)]
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
        write_text_atomic(self.out_dir / INDEX_NAME, json.dumps(index, indent=1, ensure_ascii=False))
        return index


def write_shards(pairs: Iterable[PromptPair], out_dir: Union[str, Path], **kwargs) -> dict:
    """Write all ``pairs`` with a ``ShardWriter``; returns the index."""
    with ShardWriter(out_dir, **kwargs) as writer:
        for pair in pairs:
            writer.write(pair)
    return writer.close()
