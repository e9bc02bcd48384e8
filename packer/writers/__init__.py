"""Shard writers and readers (tfrecord, wds, lmdb) with DALI-compatible index files.

One module per format holds its writer, its reader and its index; this package's registry
picks the module by format name, so no format module imports its siblings or this file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np

from packer.format import FORMATS, FormatError
from packer.writers.base import ShardReader, ShardWriter, WrittenShard, index_path

__all__ = [
    "ShardReader",
    "ShardWriter",
    "UnknownFormatError",
    "WrittenShard",
    "format_module",
    "get_writer",
    "index_path",
    "make_index",
    "open_reader",
    "read_index",
    "trim_index",
]


class UnknownFormatError(FormatError):
    """The format name is not one of `packer.format.FORMATS`."""


def format_module(fmt: str) -> ModuleType:
    """The module holding `fmt`'s Writer, Reader (and make_index/read_index/trim_index for indexed formats)."""
    if fmt not in FORMATS:
        raise UnknownFormatError(f"unknown shard format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return importlib.import_module(f"packer.writers.{fmt}")


def get_writer(fmt: str, path: Path) -> ShardWriter:
    """A writer for shard `path` in format `fmt` ("tfrecord", "wds" or "lmdb")."""
    return format_module(fmt).Writer(Path(path))


def open_reader(fmt: str, path: Path) -> ShardReader:
    """A reader for the shard at `path` (FormatError if it or its index is missing or malformed)."""
    return format_module(fmt).Reader(Path(path))


def _indexed(fmt: str) -> ModuleType:
    m = format_module(fmt)
    if not hasattr(m, "make_index"):
        raise UnknownFormatError(f"format {fmt!r} has no index file")
    return m


def make_index(fmt: str, path: Path) -> bytes:
    """Recompute the index file bytes of an existing tfrecord/wds shard by scanning it.

    Equals what DALI's `tfrecord2idx` / `wds2idx` write for that file. LMDB has no index.
    """
    return _indexed(fmt).make_index(Path(path))


def read_index(fmt: str, src: Path | str | bytes, shard_size: int | None = None) -> np.ndarray:
    """int64 (n, 2): offset and size of each record (wds: each sample's tar bytes) of a shard,
    from its index file (path or bytes), checked against the shard's size; FormatError if it
    does not fit. See `tfrecord.read_index` / `wds.read_index`."""
    return _indexed(fmt).read_index(src, shard_size)


def trim_index(fmt: str, src: Path | str | bytes, start: int, stop: int) -> bytes:
    """The index file bytes for records ``[start, stop)`` of a shard, offsets unchanged (DALI's
    readers given it read just those records of the whole file)."""
    return _indexed(fmt).trim_index(src, start, stop)
