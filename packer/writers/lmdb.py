"""LMDB: one single-file environment per split (``<split>/data.lmdb``, ``subdir=False``).

Keys are `format.lmdb_key(i)` in add order, values `format.encode_lmdb_record`, plus
`format.LMDB_COUNT_KEY`. The writer fills a hidden build environment with ordered
appends, growing the map as needed (never a map-full crash), then writes a compacted copy
(`mdb_env_copy` with MDB_CP_COMPACT) to a hidden temp file, fsyncs and renames it into
place. No lock files are created: writer and readers use ``lock=False``.
"""

from __future__ import annotations

import os
import struct
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
    sha256_file,
)
from packer.writers.base import ShardReader, ShardWriter, WrittenShard, fsync_dir, make_hidden_tmp

_INITIAL_MAP = 64 << 20
# LMDB page layout (lmdb.h/mdb.c, 0.9.x): header = pgno u64, pad u16, flags u16, lower u16, upper u16
# (overflow pages: u32 page count instead of lower/upper); nodes = lo u16, hi u16, flags u16, ksize u16.
_PAGE_HDR = struct.Struct("<QHHHH")
_NODE = struct.Struct("<HHHH")
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA = 0x01
_META_MAPSIZE = 32  # offset of mm_mapsize in a meta page (after magic u32, version u32, address u64)
_COMMIT_BYTES = 64 << 20  # bounds the dirty pages (memory) held by one write transaction


def normalize(path: Path) -> tuple[int, str]:
    """Zero the bytes LMDB leaves unspecified in a compacted file; return (size, sha256).

    A compacted copy is a function of the key/value sequence except for bytes that hold
    stale contents of reused page buffers, and the map size in the two meta pages (which
    depends on how the map grew): the free gap and the even-size padding byte of nodes in
    branch/leaf pages, and the tail after a value in its last overflow page. These depend
    on transaction boundaries and allocator history, not on the data, so they are set to
    fixed values here (zeros; the file size). LMDB never reads those bytes, and it raises a
    smaller stored map size to the data size on open.
    """
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        psize = struct.unpack_from("<I", os.pread(fd, 64, 0), 16 + 24)[0]  # mm_dbs[FREE_DBI].md_pad
        if psize < 512 or psize & (psize - 1) or size % psize:
            raise FormatError(f"{path}: unexpected LMDB page size {psize}")
        tails: list[tuple[int, int]] = []  # (first overflow page, value size)
        pgno, npages = 0, size // psize
        while pgno < npages:
            off = pgno * psize
            page = bytearray(os.pread(fd, psize, off))
            _, _, flags, lower, _ = _PAGE_HDR.unpack_from(page)
            pgno += 1
            if flags & _P_OVERFLOW:
                pgno += struct.unpack_from("<I", page, 12)[0] - 1  # skip the run, unread
                continue
            if flags & _P_META:
                new = bytearray(page)
                new[_META_MAPSIZE : _META_MAPSIZE + 8] = size.to_bytes(8, "little")
            elif flags & (_P_BRANCH | _P_LEAF):
                new = bytearray(psize)
                new[:lower] = page[:lower]  # header + node pointers
                for i in range(16, lower, 2):
                    ptr = int.from_bytes(page[i : i + 2], "little")
                    lo, hi, nflags, ksize = _NODE.unpack_from(page, ptr)
                    n = 8 + ksize
                    if flags & _P_LEAF:
                        dsize = lo | hi << 16
                        if nflags & _F_BIGDATA:
                            tails.append((int.from_bytes(page[ptr + n : ptr + n + 8], "little"), dsize))
                            n += 8
                        else:
                            n += dsize
                    new[ptr : ptr + n] = page[ptr : ptr + n]
            else:
                raise FormatError(f"{path}: unexpected LMDB page flags {flags:#x} on page {pgno - 1}")
            if new != page:
                os.pwrite(fd, new, off)
        for first, dsize in tails:
            start = first * psize + 16 + dsize
            end = (first + (15 + dsize) // psize + 1) * psize  # LMDB's OVPAGES
            tail = os.pread(fd, end - start, start)
            if tail.count(0) != len(tail):
                os.pwrite(fd, bytes(len(tail)), start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, sha256_file(path)


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
                readahead=False, max_dbs=0,
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
    """Reads an LMDB shard read-only without a lock file; reopens itself after fork."""

    def __init__(self, path: Path):
        super().__init__(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: LMDB file not found")
        self._pid = -1
        self._env: lmdb.Environment | None = None
        self._txn: lmdb.Transaction | None = None
        self._open()
        assert self._txn is not None
        raw = self._txn.get(LMDB_COUNT_KEY)
        if raw is None or not bytes(raw).isdigit():
            raise FormatError(f"{self.path}: missing or malformed {LMDB_COUNT_KEY.decode()} key")
        self._n = int(bytes(raw))
        entries = self._txn.stat()["entries"]
        if entries != self._n + 1:
            raise FormatError(f"{self.path}: {entries - 1} records but the count key says {self._n}")

    def _open(self) -> None:
        try:
            self._env = lmdb.open(
                str(self.path), subdir=False, readonly=True, lock=False, readahead=False, max_dbs=0
            )
        except lmdb.Error as e:
            raise FormatError(f"{self.path}: not a readable LMDB file ({e})") from None
        self._txn = self._env.begin(buffers=True)
        self._pid = os.getpid()

    def _t(self) -> lmdb.Transaction:
        if self._pid != os.getpid():  # an LMDB environment must not cross fork
            self._env = self._txn = None
            self._open()
        if self._txn is None:
            raise ValueError(f"{self.path}: reader is closed")
        return self._txn

    def __len__(self) -> int:
        return self._n

    def _decode(self, buf: memoryview | bytes, pos: int) -> Record:
        try:
            return decode_lmdb_record(buf)
        except (FormatError, UnicodeDecodeError) as e:
            raise FormatError(f"{self.path}: record {pos}: {e}") from None

    def read(self, pos: int) -> Record:
        pos = self._check_pos(pos)
        buf = self._t().get(lmdb_key(pos))
        if buf is None:
            raise FormatError(f"{self.path}: record {pos} missing")
        return self._decode(buf, pos)

    def __iter__(self) -> Iterator[Record]:
        pos = 0
        with self._t().cursor() as cur:
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
        if self._txn is not None and self._pid == os.getpid():
            self._txn.abort()
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._txn = self._env = None
