"""`DatasetLocation`: a packed dataset in a local folder or at a URL, behind one interface.

Every reader of a packed dataset (verify, info, pull, push's source, the trainer's remote
path) asks it for the manifest (its exact bytes, parsed by `format.parse_manifest`), a
split's label arrays (checked against the manifest's class and shard counts) or a file as
a local path: the file itself for a folder, a temporary download for a URL. None of them
branches on local-vs-URL itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packer.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    FormatError,
    LabelArrays,
    Manifest,
    ShardInfo,
    parse_manifest,
)
from packer.schema import MANIFEST_MAX_BYTES, DamagedDataset
from packer.storage.files import download, read_bytes, remote_sizes
from packer.storage.fs import (
    DEFAULT_ATTEMPTS,
    READ_ONLY,
    OversizeError,
    RemoteError,
    display_url,
    get_fs,
    is_url,
    join,
    protocol_of,
    redact,
    retry,
    unreachable,
)
from packer.storage.transfer import labels_max_bytes


class DatasetLocation:
    """A packed dataset at `where`: a folder, or a URL (s3://, gs://, http(s)://, file://, ...).

    `filesystem` replaces the fsspec filesystem made from a URL (tests inject faults this way);
    `attempts` bounds the retries of each remote read. The manifest is read once and kept
    (`manifest`: one the caller already read from there).
    """

    def __init__(self, where: str | os.PathLike, storage_options: dict[str, Any] | None = None, *,
                 attempts: int = DEFAULT_ATTEMPTS, filesystem: Any = None, manifest: Manifest | None = None):
        self.where = str(where)
        self.storage_options = dict(storage_options or {})
        self.attempts = attempts
        self.remote = filesystem is not None or is_url(self.where)
        self.display = display_url(self.where) if self.remote else str(Path(self.where))
        self.path = None if self.remote else Path(self.where)  # a folder: its files are used in place
        if filesystem is not None:
            self.fs, self.root = filesystem, filesystem._strip_protocol(self.where).rstrip("/")
        else:  # a folder too, for writers (push to a plain path)
            self.fs, self.root = get_fs(self.where, self.storage_options)
        self._bytes: bytes | None = None
        self._manifest = manifest

    def where_of(self, rel: str) -> str:
        """`rel`'s place for messages (no credentials)."""
        return f"{self.display}/{rel}" if self.path is None else str(self.path / rel)

    def manifest_bytes(self) -> bytes:
        """The manifest's exact bytes (push/pull copy them unchanged); FormatError if there is none
        (not a dataset, or its build/upload did not finish) or a folder's cannot be read, RemoteError
        if storage fails. At most MANIFEST_MAX_BYTES + 1 are read: a huge file is refused, not loaded."""
        if self._bytes is not None:
            return self._bytes
        where = self.where_of(MANIFEST_NAME)
        try:
            self._bytes = read_bytes(self.fs, join(self.root, MANIFEST_NAME), self.attempts, limit=MANIFEST_MAX_BYTES)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FormatError(f"{where} not found: not a packed dataset, or its "
                              f"{'build/upload' if self.remote else 'build'} did not finish") from None
        except OSError as e:
            if self.path is not None:
                raise FormatError(f"{where}: cannot read ({e.strerror or e})") from None
            raise self._remote_error(where, e) from None
        except Exception as e:
            raise self._remote_error(where, e) from None
        return self._bytes

    def _remote_error(self, where: str, e: Exception) -> RemoteError:
        """One line for a failed remote read: the endpoint when the network failed, else the error, redacted."""
        err = unreachable(e, self.where, self.storage_options, self.attempts)
        return err or RemoteError(f"cannot read {where}: {redact(str(e), self.storage_options)}")

    def manifest(self) -> Manifest:
        """The validated manifest (FormatError naming the location if it is absent or invalid)."""
        if self._manifest is None:
            self._manifest = parse_manifest(self.manifest_bytes(), self.where_of(MANIFEST_NAME))
        return self._manifest

    def labels(self, split: str, *, check_count: bool = True) -> LabelArrays:
        """`split`'s label arrays, checked against the contract and the manifest's class and shard
        counts (and, with `check_count`, its sample count); FormatError if absent or wrong."""
        m = self.manifest()
        if split not in m.splits:
            raise FormatError(f"{self.display} has no split {split!r} (it has {', '.join(m.splits)})")
        info = m.splits[split]
        where = self.where_of(info.labels)
        if self.path is not None:
            src: Any = self.path / info.labels
        else:
            limit = labels_max_bytes(info.num_samples, info.num_boxes)
            try:
                data = read_bytes(self.fs, join(self.root, info.labels), self.attempts, limit=limit)
            except FileNotFoundError:
                raise DamagedDataset(f"{where} not found") from None
            if len(data) > limit:
                raise DamagedDataset(f"{where}: longer than the {limit} bytes its manifest allows")
            src = io.BytesIO(data)
        try:
            la = LabelArrays.load(src, num_classes=len(m.names), num_shards=len(info.shards))
        except FormatError as e:
            # read from memory, the message names "labels.npz": name the URL instead
            msg = str(e) if self.path is not None else f"{where}: {str(e).removeprefix(f'{LABELS_NAME}: ')}"
            raise DamagedDataset(msg) from None
        if check_count and len(la) != info.num_samples:
            raise DamagedDataset(f"{where}: {len(la)} samples, the manifest says {info.num_samples}")
        return la

    def check_shard_files(self) -> bool:
        """DamagedDataset naming the first shard missing or of another size than the manifest
        says, or index file missing. Sizes come from one listing (a folder, s3, gs, file://);
        False where the store cannot list (http): nothing was checked."""
        m = self.manifest()
        shards = [sh for s in m.splits.values() for sh in s.shards]
        if self.path is None and protocol_of(self.fs) in READ_ONLY:
            return False
        rels = [r for sh in shards for r in (sh.path, sh.index) if r]
        sizes = remote_sizes(self.fs, self.root, rels, self.attempts)
        for sh in shards:
            for rel, want in ((sh.path, sh.bytes), (sh.index, None)):
                if rel and (rel not in sizes or want not in (None, sizes[rel])):
                    what = "missing" if rel not in sizes else f"{sizes[rel]} bytes, the manifest says {want}"
                    raise DamagedDataset(f"{self.where_of(rel)}: {what} (packer verify checks every file)")
        return True

    @contextlib.contextmanager
    def local(self, rel: str | None) -> Iterator[Path | None]:
        """`rel` as a local file for the block: the file itself in a folder, a temporary download
        of a URL's (removed afterwards); None when `rel` is None or the file is absent."""
        if self.path is not None or rel is None:
            p = self.path / rel if self.path is not None and rel else None
            yield p if p is not None and p.is_file() else None
            return
        with tempfile.TemporaryDirectory(prefix="packer-fetch-") as d:
            yield self._fetch(rel, Path(d))

    @contextlib.contextmanager
    def local_shard(self, sh: ShardInfo, *, checked: bool = False) -> Iterator[tuple[Path | None, Path | None]]:
        """(shard, index file) as local files for the block, the index next to its shard where the
        readers look for it: in place for a folder (read as it is: the readers check each record),
        temporary downloads of a URL's (with `checked`, ChecksumError unless the shard's size and
        sha256 equal the manifest's: a download is the moment to check). None where absent."""
        if self.path is not None:
            with self.local(sh.path) as path, self.local(sh.index) as idx:
                yield path, idx
            return
        with tempfile.TemporaryDirectory(prefix="packer-fetch-") as d:
            path = self._fetch(sh.path, Path(d), sh, checked=checked)
            yield path, self._fetch(sh.index, Path(d), sh) if sh.index else None

    def _fetch(self, rel: str, folder: Path, sh: ShardInfo | None = None, *, checked: bool = False) -> Path | None:
        """Download `rel` into `folder`; None if absent. With `sh`, reading stops past the shard's
        size (a shard, or its far smaller index: ChecksumError beyond it); `checked` also requires
        the shard's exact size and sha256."""
        dest = folder / rel.rsplit("/", 1)[-1]
        exact = sh if checked else None
        try:
            retry(lambda: download(self.fs, join(self.root, rel), dest, sha256=exact.sha256 if exact else None,
                                   size=exact.bytes if exact else None, max_bytes=sh.bytes if sh else None),
                  attempts=self.attempts)
        except FileNotFoundError:
            return None
        except OversizeError:  # named by its place in the dataset, not the store's full path
            raise OversizeError(f"{rel}: longer than the {sh.bytes} bytes the manifest allows") from None
        return dest


def open_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The validated manifest of the dataset at `url` (or folder); FormatError if absent."""
    return DatasetLocation(url, storage_options).manifest()


def fetch_labels(url: str, split: str, storage_options: dict[str, Any] | None = None,
                 manifest: Manifest | None = None) -> LabelArrays:
    """The label arrays of `split` read straight from `<url>/<split>/labels.npz` (no local copy);
    RemoteError if the dataset has no such split."""
    loc = DatasetLocation(url, storage_options, manifest=manifest)
    m = loc.manifest()
    if split not in m.splits:
        raise RemoteError(f"{loc.display} has no split {split!r} (it has {', '.join(m.splits)})")
    return loc.labels(split)
