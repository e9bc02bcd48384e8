"""LMDB: one single-file environment per split (``<split>/data.lmdb``, ``subdir=False``).

Keys are `format.lmdb_key(i)` in add order, values `format.encode_lmdb_record`, plus
`format.LMDB_COUNT_KEY`. The writer fills a hidden build environment with ordered
appends, growing the map as needed (never a map-full crash), then writes a compacted copy
(`mdb_env_copy` with MDB_CP_COMPACT) to a hidden temp file, zeroes the bytes LMDB leaves
unspecified (`normalize`: the file then depends on the records only), fsyncs and renames it
into place. No lock files are created: writer and readers use ``lock=False``. The Reader is
what the trainer uses too (lazily opened per process, so safe across DataLoader forks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import lmdb

from packer.format import (
    LMDB_COUNT_KEY,
    FormatError,
    Record,
    decode_lmdb_record,
    encode_lmdb_record,
    lmdb_key,
)
from packer.writers.base import ShardReader, ShardWriter, WrittenShard, fsync_dir, make_hidden_tmp
from packer.writers.lmdb_pages import LMDB_ENGINE, check_pages, normalize

_INITIAL_MAP = 64 << 20
_COMMIT_BYTES = 64 << 20  # bounds the dirty pages (memory) held by one write transaction

def _hidden_tmp(target: Path, suffix: str) -> Path:
    fd, tmp = make_hidden_tmp(target, suffix)
    os.close(fd)
    return tmp


class Writer(ShardWriter):
    """Appends records to a build environment; `close` writes the compacted file."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._build = _hidden_tmp(self.path, ".build.tmp")
        self._final: Path | None = None
        self._map = _INITIAL_MAP
        try:
            self._env = lmdb.open(
                str(self._build), subdir=False, map_size=self._map, lock=False, sync=False, metasync=False,
                readahead=False, max_dbs=0, lib_version=LMDB_ENGINE,
            )
        except BaseException:
            self._build.unlink(missing_ok=True)
            raise
        self._psize = self._env.stat()["psize"]
        self._txn: lmdb.Transaction | None = self._env.begin(write=True)
        self._pending: list[bytes] = []  # values of the open transaction, replayed after a map resize
        self._pending_bytes = 0

    def _used(self) -> int:
        return (self._env.info()["last_pgno"] + 1) * self._psize

    def _commit(self) -> None:
        assert self._txn is not None
        self._txn.commit()
        self._txn = None
        self._pending, self._pending_bytes = [], 0

    def _grow(self, need: int) -> None:
        """Resize the map (no transaction may be open) to at least twice what is needed."""
        while self._map < 2 * need:
            self._map *= 2
        self._env.set_mapsize(self._map)

    def _replay(self) -> None:
        """Re-put the pending values after an aborted transaction (MapFullError)."""
        first = self.num_samples - len(self._pending)
        while True:
            self._txn = self._env.begin(write=True)
            try:
                for i, v in enumerate(self._pending):
                    self._txn.put(lmdb_key(first + i), v, append=True)
                return
            except lmdb.MapFullError:
                self._txn.abort()
                self._txn = None
                self._grow(self._used() + 2 * self._pending_bytes + (1 << 20))

    def add(self, rec: Record) -> None:
        self._check_open()
        v = encode_lmdb_record(rec)
        # Each value takes ceil((len+16)/psize) overflow pages; leave room for the tree too.
        need = self._used() + 2 * (self._pending_bytes + len(v)) + (1 << 20)
        if need > self._map:
            self._commit()
            self._grow(need)
            self._txn = self._env.begin(write=True)
        assert self._txn is not None
        self._pending.append(v)
        self._pending_bytes += len(v)
        self.num_samples += 1
        try:
            self._txn.put(lmdb_key(self.num_samples - 1), v, append=True)
        except lmdb.MapFullError:
            self._txn.abort()
            self._txn = None
            self._grow(self._used() + 2 * self._pending_bytes + (1 << 20))
            self._replay()
        if self._pending_bytes >= _COMMIT_BYTES:
            self._commit()
            self._txn = self._env.begin(write=True)

    def close(self) -> WrittenShard:
        if self._result is not None:
            return self._result
        self._check_open()
        try:
            assert self._txn is not None
            try:
                self._txn.put(LMDB_COUNT_KEY, str(self.num_samples).encode())
            except lmdb.MapFullError:
                self._txn.abort()
                self._txn = None
                self._grow(self._used() + 2 * self._pending_bytes + (1 << 20))
                self._replay()
                assert self._txn is not None
                self._txn.put(LMDB_COUNT_KEY, str(self.num_samples).encode())
            self._commit()
            self._final = _hidden_tmp(self.path, ".tmp")
            fd = os.open(self._final, os.O_WRONLY | os.O_TRUNC)
            try:
                self._env.copyfd(fd, compact=True)
            finally:
                os.close(fd)
            self._env.close()
            size, sha = normalize(self._final)
            self._build.unlink(missing_ok=True)
            os.replace(self._final, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        self._result = WrittenShard(self.path, None, self.num_samples, size, sha)
        return self._result

    def abort(self) -> None:
        if self._result is not None:
            return
        self._aborted = True
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()
        self._build.unlink(missing_ok=True)
        if self._final is not None:
            self._final.unlink(missing_ok=True)


class Reader(ShardReader):
    """Reads an LMDB shard read-only and without a lock file (``readonly=True, lock=False``).

    The record count is checked when the Reader is made; the environment is then opened lazily,
    once per process, on first use: a Reader made before fork (torch DataLoader workers) is safe,
    each process opens its own. Map-style access (``len(r)``, ``r[i]``) as a torch Dataset.
    """

    def __init__(self, path: Path):
        super().__init__(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: LMDB file not found")
        check_pages(self.path)  # before LMDB maps it: a pointer out of the file would be a SIGBUS
        self._pid = -1
        self._env: lmdb.Environment | None = None
        self._txn: lmdb.Transaction | None = None
        self._closed = False
        try:
            with self._lmdb_errors():
                self._n = self._count(self._t())
        finally:
            self._release()  # opened again where it is used

    @contextlib.contextmanager
    def _lmdb_errors(self) -> Iterator[None]:
        """LMDB's own refusals of a damaged file (MDB_CORRUPTED, a page not found) as one FormatError."""
        try:
            yield
        except lmdb.Error as e:
            raise FormatError(f"{self.path}: damaged LMDB file ({e})") from None

    def _count(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(LMDB_COUNT_KEY)
        if raw is None or not bytes(raw).isdigit():
            raise FormatError(f"{self.path}: missing or malformed {LMDB_COUNT_KEY.decode()} key")
        n = int(bytes(raw))
        entries = txn.stat()["entries"]
        if entries != n + 1:
            raise FormatError(f"{self.path}: {entries - 1} records but the count key says {n}")
        return n

    def _t(self) -> lmdb.Transaction:
        """This process's read transaction, opening the environment here first if needed."""
        if self._closed:
            raise ValueError(f"{self.path}: reader is closed")
        if self._pid != os.getpid():  # an LMDB environment must not be used across fork
            self._release()
            try:
                self._env = lmdb.open(
                    str(self.path), subdir=False, readonly=True, lock=False, readahead=False, max_dbs=0
                )
            except lmdb.Error as e:
                raise FormatError(f"{self.path}: not a readable LMDB file ({e})") from None
            self._txn = self._env.begin(buffers=True)
            self._pid = os.getpid()
        assert self._txn is not None
        return self._txn

    def _release(self) -> None:
        """Close the environment. One inherited across fork is closed too, which is safe without
        a lock file (it unmaps only this process's copy) and lets this process open the file."""
        if self._txn is not None:
            self._txn.abort()
        if self._env is not None:
            self._env.close()
        self._txn = self._env = None
        self._pid = -1

    def __len__(self) -> int:
        return self._n

    def _decode(self, buf: memoryview | bytes, pos: int) -> Record:
        try:
            return decode_lmdb_record(buf)
        except (FormatError, UnicodeDecodeError) as e:
            raise FormatError(f"{self.path}: record {pos}: {e}") from None

    def read(self, pos: int) -> Record:
        pos = self._check_pos(pos)
        with self._lmdb_errors():
            buf = self._t().get(lmdb_key(pos))
        if buf is None:
            raise FormatError(f"{self.path}: record {pos} missing")
        return self._decode(buf, pos)

    def __iter__(self) -> Iterator[Record]:
        pos = 0
        with self._lmdb_errors(), self._t().cursor() as cur:
            for k, v in cur:
                k = bytes(k)
                if k == LMDB_COUNT_KEY:
                    continue
                if k != lmdb_key(pos):
                    raise FormatError(f"{self.path}: record {pos}: unexpected key {k!r}")
                yield self._decode(v, pos)
                pos += 1
        if pos != self._n:
            raise FormatError(f"{self.path}: {pos} records but the count key says {self._n}")

    def close(self) -> None:
        self._release()
        self._closed = True
