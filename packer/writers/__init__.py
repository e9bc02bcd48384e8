"""Shard writers and readers (tfrecord, wds, lmdb) with DALI-compatible index files."""

from packer.writers.base import (
    ShardReader,
    ShardWriter,
    UnknownFormatError,
    WrittenShard,
    get_writer,
    index_path,
    make_index,
    open_reader,
)

__all__ = [
    "ShardReader",
    "ShardWriter",
    "UnknownFormatError",
    "WrittenShard",
    "get_writer",
    "index_path",
    "make_index",
    "open_reader",
]
