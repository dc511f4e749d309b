"""WebDataset tar shards of prompt pairs: writing, an index, and exact, resumable reading.

index.py: the directory layout, ``index.json`` and ``ShardError`` · writer.py: ``ShardWriter``
(each shard renamed when complete, the index written last) · tar.py: reading one shard
(member table, header checks, sample i) and ``verify_shards`` · plan.py: the epoch plan
(which rank and worker reads which sample, without communication) · loader.py:
``ShardDataset`` / ``ShardLoader`` for training.
"""

from ear_dist.data.shards.index import (
    INDEX_NAME, INDEX_VERSION, MEMBER_COLUMNS, OFFSETS_SUFFIX, TOKEN_FIELDS, ShardError, read_index,
)
from ear_dist.data.shards.loader import (
    ShardDataset, ShardLoader, check_index_tokens, resolve_rank, shard_loader_from_config,
)
from ear_dist.data.shards.plan import EpochPlan, ShardPosition, buffer_shuffle
from ear_dist.data.shards.tar import member_table, verify_shards
from ear_dist.data.shards.writer import ShardWriter, config_hash, write_shards

__all__ = [
    "INDEX_NAME", "INDEX_VERSION", "MEMBER_COLUMNS", "OFFSETS_SUFFIX", "TOKEN_FIELDS",
    "EpochPlan", "ShardDataset", "ShardError", "ShardLoader", "ShardPosition", "ShardWriter",
    "buffer_shuffle", "check_index_tokens", "config_hash", "member_table", "read_index", "resolve_rank",
    "shard_loader_from_config", "verify_shards", "write_shards",
]
