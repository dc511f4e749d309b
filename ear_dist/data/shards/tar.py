"""Reading one shard: its member table, header checks, and random access to sample i.

``member_table`` finds where each sample's members lie by parsing ustar headers
directly (``tarfile`` for what that scan cannot parse). ``OpenShard`` memory-maps a
tar and reads a sample by its index, trusting the offsets table written beside the
shard only after checking every header it points at.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ear_dist.data.pairs import PromptPair
from ear_dist.data.shards.index import MEMBER_COLUMNS, TOKEN_FIELDS, ShardError, read_index

log = logging.getLogger(__name__)

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
    """The offsets table of a shard (see ``index.OFFSETS_SUFFIX``), from walking its headers."""
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


class OpenShard:
    """One tar (memory-mapped) and where each sample's members lie; reads a sample by index.

    With the offsets table written beside the shard, opening costs one vectorized
    header check; without it (shards from other tools) the headers are walked.
    """

    def __init__(self, path: Path, expected_samples: int, expected_bytes: Optional[int] = None,
                 offsets_path: Optional[Path] = None):
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


def verify_shards(shard_dir: Union[str, Path]) -> list[str]:
    """Open and read every sample of every shard; returns one message per bad shard."""
    root = Path(shard_dir)
    problems = []
    for shard in read_index(root)["shards"]:
        try:
            offsets = root / shard["offsets"] if shard.get("offsets") else None
            opened = OpenShard(root / shard["name"], shard["samples"], shard.get("bytes"), offsets)
            try:
                for i in range(opened.num_samples):
                    opened.read(i)
            finally:
                opened.close()
        except ShardError as e:
            problems.append(str(e))
    return problems
