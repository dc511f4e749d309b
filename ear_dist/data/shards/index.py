"""What a shard directory holds and its index: names, format version, ``read_index``, ``ShardError``.

Layout of a shard directory::

    pairs-000000.tar           # samples "000000042.json" (+ ".surrogate_tokens.npy", ".target_tokens.npy")
    pairs-000000.tar.idx.npy   # where each sample's members lie (optional; readers walk the tar without it)
    pairs-000001.tar
    ...
    index.json                 # samples and bytes per shard, concept counts, config hash, and per shard
                               # the range of its stored token counts and ids ("tokens")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from ear_dist.data.pairs import TOKEN_FIELDS  # noqa: F401 (re-exported: the shard member names)
from ear_dist.errors import InputError

INDEX_NAME = "index.json"
INDEX_VERSION = 1
# beside each shard: int64 [samples, 6] = (offset, size) of its json, surrogate_tokens.npy and
# target_tokens.npy members (-1 when absent), so readers need not walk the tar headers
OFFSETS_SUFFIX = ".idx.npy"
MEMBER_COLUMNS = ("json", "surrogate_tokens.npy", "target_tokens.npy")


class ShardError(InputError, RuntimeError):
    """A shard that cannot be read (truncated, corrupt, or disagreeing with the index)."""


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
