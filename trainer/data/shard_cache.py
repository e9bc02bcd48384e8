"""The trainer's local cache of shards read from network storage (LRU, shared by the ranks of a machine).

`cache_shards(url, shard_paths, cache_dir)` makes checksum-verified local copies of some
shards of the dataset at `url` in `cache_dir/<url_key(url)>/<shard path>` (each index file
next to its shard). A copy is reused while its size and sha256 equal the manifest's and its
index equals the index recomputed from it. With `max_bytes` the least recently used files
(file mtime = last use) that the request does not need are evicted. Ranks may call it at
once: each file is fetched under a per-file flock(2) into a temp file and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from packer.format import INDEX_SUFFIX, SHARD_EXT, FormatError, Manifest, ShardInfo, sha256_file
from packer.storage.files import download
from packer.storage.fs import ChecksumError, RemoteError, display_url, endpoint_url, join, retry
from packer.storage.location import DatasetLocation

LOCKS = ".locks"  # per-file locks and the eviction lock, inside the cache folder
_KEY = re.compile(r"^[0-9a-f]{16}$")  # url_key folders
_SHARD_FILE = re.compile("(" + "|".join(re.escape(e) for e in SHARD_EXT.values()) + ")(" + re.escape(INDEX_SUFFIX) + ")?$")


class CacheFullError(RemoteError):
    """`cache_shards` cannot fit the requested shards under `max_bytes`."""


def url_key(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Cache folder name for a dataset URL: hash of the URL (no credentials) and its endpoint."""
    ident = display_url(str(url)).rstrip("/") + "|" + display_url(endpoint_url(url, storage_options))
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock between processes (ranks) on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _index_of(local: Path) -> Path:
    return local.with_name(local.name + INDEX_SUFFIX)


def _cached_ok(fmt: str, local: Path, sh: ShardInfo) -> bool:
    """The cached copy (and its index) is exactly what the manifest describes."""
    from packer.writers import make_index

    try:
        if local.stat().st_size != sh.bytes or sha256_file(local) != sh.sha256:
            return False
        if sh.index:
            idx = _index_of(local)
            return idx.is_file() and idx.read_bytes() == make_index(fmt, local)
    except (OSError, FormatError):
        return False
    return True


def _cache_files(cache_dir: Path) -> list[tuple[Path, int, float]]:
    """Every shard or index copy this cache made: (path, size, last use). Only files with a
    shard's or index's name inside a `url_key` folder count, so a user's own files in
    --cache-dir and the decoded stores beside them are never evicted."""
    out = []
    for d in cache_dir.iterdir() if cache_dir.is_dir() else []:
        if not (_KEY.match(d.name) and d.is_dir() and not d.is_symlink()):
            continue
        for p in d.rglob("*"):
            if p.name.startswith(".") or LOCKS in p.parts or not _SHARD_FILE.search(p.name) or not p.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((p, st.st_size, st.st_mtime))
    return out


def _make_room(cache_dir: Path, need: int, max_bytes: int, keep: set[Path], strict: bool = True) -> None:
    """Evict least recently used files outside `keep` until `need` more bytes fit."""
    files = _cache_files(cache_dir)
    total = sum(s for _, s, _ in files)
    for p, s, _ in sorted(files, key=lambda t: t[2]):
        if total + need <= max_bytes:
            return
        if p in keep:
            continue
        p.unlink(missing_ok=True)
        total -= s
    if total + need > max_bytes and strict:
        raise CacheFullError(
            f"shard cache {cache_dir} cannot hold {need} more bytes under --cache-max {max_bytes} "
            f"({total} bytes are in use by this request); raise the limit"
        )


def cache_shards(
    url: str,
    shard_paths: list[str],
    cache_dir: str | os.PathLike,
    storage_options: dict[str, Any] | None = None,
    max_bytes: int | None = None,
    *,
    manifest: Manifest | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, Path]:
    """Make local, checksum-verified copies of some shards of the dataset at `url` (see the
    module doc); `shard_paths` are manifest-relative ("train/train-00003.tfrecord"). With
    `max_bytes` the whole `cache_dir` stays under it. Returns {shard path: local path}."""
    src = DatasetLocation(url, storage_options, manifest=manifest)
    m = src.manifest()
    by_path = {sh.path: sh for s in m.splits.values() for sh in s.shards}
    unknown = [p for p in shard_paths if p not in by_path]
    if unknown:
        raise RemoteError(f"{src.display}: not shards of this dataset: {', '.join(unknown[:5])}")
    cache_dir = Path(cache_dir)
    root = cache_dir / url_key(url, storage_options)
    wanted = {p: root / p for p in dict.fromkeys(shard_paths)}
    keep = set(wanted.values()) | {_index_of(q) for q in wanted.values()}
    if max_bytes is not None and (need := sum(by_path[p].bytes for p in wanted)) > max_bytes:
        raise CacheFullError(f"the requested shards need {need} bytes, more than the cache limit {max_bytes}")
    for p, local in wanted.items():
        with _flock(root / LOCKS / (hashlib.sha1(p.encode()).hexdigest()[:16] + ".lock")):
            if not _cached_ok(m.format, local, by_path[p]):
                _fetch_one(src, by_path[p], local, cache_dir, max_bytes, keep, on_bytes)
            os.utime(local)  # last use = mtime: the LRU order for eviction
            if by_path[p].index:
                os.utime(_index_of(local))
    if max_bytes is not None:  # index files were not known in advance: trim again
        with _flock(cache_dir / LOCKS / "evict.lock"):
            _make_room(cache_dir, 0, max_bytes, keep, strict=False)
    return wanted


def _fetch_one(src: DatasetLocation, sh: ShardInfo, local: Path, cache_dir: Path, max_bytes: int | None,
               keep: set[Path], on_bytes: Callable[[int], None] | None) -> None:
    """Download one shard and its index into the cache (room made first), both checked."""
    from packer.writers import make_index

    if max_bytes is not None:
        with _flock(cache_dir / LOCKS / "evict.lock"):
            present = local.stat().st_size if local.is_file() else 0
            _make_room(cache_dir, max(0, sh.bytes - present), max_bytes, keep)
    retry(lambda: download(src.fs, join(src.root, sh.path), local, sha256=sh.sha256, size=sh.bytes,
                           on_bytes=on_bytes))
    if sh.index:
        idx = _index_of(local)
        retry(lambda: download(src.fs, join(src.root, sh.index), idx, max_bytes=sh.bytes))
        if idx.read_bytes() != make_index(src.manifest().format, local):
            idx.unlink(missing_ok=True)
            raise ChecksumError(f"{src.display}/{sh.index} does not match its shard")
