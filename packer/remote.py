"""Temporary: trainer/data/* switches to packer.storage / trainer.data.shard_cache, then this goes.

Exactly the names trainer/data/* imports from here today (nothing else imports this module),
re-exported from where they now live. The shard cache belongs to the trainer and is
loaded only on first use (importing trainer.data pulls in torch, which packer never needs).
"""

from __future__ import annotations

from typing import Any

from packer.storage.files import CHUNK, hash_remote, open_stream, read_bytes
from packer.storage.fs import ChecksumError, RemoteError, display_url, get_fs, is_url, join, redact, retry
from packer.storage.location import fetch_labels, open_manifest

_SHARD_CACHE = ("cache_shards", "url_key")

__all__ = ["CHUNK", "ChecksumError", "RemoteError", "display_url", "fetch_labels", "get_fs", "hash_remote", "is_url",
           "join", "open_manifest", "open_stream", "read_bytes", "redact", "retry", *_SHARD_CACHE]


def __getattr__(name: str) -> Any:
    if name in _SHARD_CACHE:
        from trainer.data import shard_cache

        return getattr(shard_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
