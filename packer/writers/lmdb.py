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
_COMMIT_BYTES = 64 << 20  # bounds the dirty pages (memory) held by one write transaction

# --- LMDB's on-disk page layout, as `normalize` relies on it --------------------------------------
# Not an API: read from lmdb.h/mdb.c of LMDB 0.9 and verified against the engine py-lmdb bundles
# for it. The writer asks py-lmdb for that engine by name (``lib_version=0``; py-lmdb also bundles
# LMDB 1.0, whose format differs), tests/test_formats_lib.py pins its version and fails when it
# changes, and at run time the meta page's magic and data-format version are checked, so a file of
# another layout is refused rather than rewritten. Page header = pgno u64, pad u16, flags u16,
# lower u16, upper u16 (overflow pages: u32 page count instead of lower/upper); node = lo u16,
# hi u16, flags u16, ksize u16.
LMDB_ENGINE = 0  # py-lmdb's `lib_version` for its LMDB 0.9.x engine
VERIFIED_LMDB_VERSION = (0, 9, 36)  # lmdb.version(lib_version=LMDB_ENGINE) the layout was checked against
_MAGIC, _DATA_VERSION = 0xBEEFC0DE, 1  # MDB_MAGIC, MDB_DATA_VERSION
_PAGE_HDR = struct.Struct("<QHHHH")
_NODE = struct.Struct("<HHHH")
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA = 0x01
_META = struct.Struct("<IIQQI")  # at byte 16 of a meta page: magic, version, address, mapsize, dbs[0].md_pad
_META_MAPSIZE = 16 + 16  # byte offset of mm_mapsize in a meta page


def _page_size(head: bytes, path: Path, size: int) -> int:
    """The page size from the first meta page (FREE_DBI's md_pad holds it); refuse other layouts."""
    magic, version, _, _, psize = _META.unpack_from(head, 16)
    if magic != _MAGIC or version != _DATA_VERSION:
        raise FormatError(f"{path}: LMDB data format {magic:#x}/{version} is not the one normalize was verified "
                          f"for ({_MAGIC:#x}/{_DATA_VERSION}, lmdb {'.'.join(map(str, VERIFIED_LMDB_VERSION))})")
    if psize < 512 or psize & (psize - 1) or size % psize:
        raise FormatError(f"{path}: unexpected LMDB page size {psize}")
    return psize


def _clean_node_page(page: bytes, leaf: bool, tails: list[tuple[int, int]]) -> bytearray:
    """A branch/leaf page with only its header, node pointers and nodes kept (the rest zero);
    appends (first overflow page, value size) of each big value to `tails`."""
    lower = _PAGE_HDR.unpack_from(page)[3]
    new = bytearray(len(page))
    new[:lower] = page[:lower]  # header + node pointers
    for i in range(16, lower, 2):
        ptr = int.from_bytes(page[i : i + 2], "little")
        lo, hi, nflags, ksize = _NODE.unpack_from(page, ptr)
        n = 8 + ksize
        if leaf and nflags & _F_BIGDATA:
            tails.append((int.from_bytes(page[ptr + n : ptr + n + 8], "little"), lo | hi << 16))
            n += 8
        elif leaf:
            n += lo | hi << 16
        new[ptr : ptr + n] = page[ptr : ptr + n]
    return new


def normalize(path: Path) -> tuple[int, str]:
    """Zero the bytes LMDB leaves unspecified in a compacted file; return (size, sha256).

    A compacted copy is a function of the key/value sequence except for bytes that hold
    stale contents of reused page buffers, and the map size in the two meta pages (which
    depends on how the map grew): the free gap and the even-size padding byte of nodes in
    branch/leaf pages, and the tail after a value in its last overflow page. These depend
    on transaction boundaries and allocator history, not on the data, so they are set to
    fixed values here (zeros; the file size). LMDB never reads those bytes, and it raises a
    smaller stored map size to the data size on open. LMDB has no documented way to this.
    """
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        psize = _page_size(os.pread(fd, 64, 0), path, size)
        tails: list[tuple[int, int]] = []
        pgno = 0
        while pgno < size // psize:
            page = os.pread(fd, psize, pgno * psize)
            flags = _PAGE_HDR.unpack_from(page)[2]
            if flags & _P_OVERFLOW:
                pgno += struct.unpack_from("<I", page, 12)[0]  # skip the run, unread
                continue
            if flags & _P_META:
                new = bytearray(page)
                new[_META_MAPSIZE : _META_MAPSIZE + 8] = size.to_bytes(8, "little")
            elif flags & (_P_BRANCH | _P_LEAF):
                new = _clean_node_page(page, bool(flags & _P_LEAF), tails)
            else:
                raise FormatError(f"{path}: unexpected LMDB page flags {flags:#x} on page {pgno}")
            if new != page:
                os.pwrite(fd, new, pgno * psize)
            pgno += 1
        for first, dsize in tails:  # a value's last overflow page: zero what follows the value
            start = first * psize + 16 + dsize
            end = (first + (15 + dsize) // psize + 1) * psize  # LMDB's OVPAGES
            if os.pread(fd, end - start, start).count(0) != end - start:
                os.pwrite(fd, bytes(end - start), start)
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
        self._pid = -1
        self._env: lmdb.Environment | None = None
        self._txn: lmdb.Transaction | None = None
        self._closed = False
        try:
            self._n = self._count(self._t())
        finally:
            self._release()  # opened again where it is used

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
        self._release()
        self._closed = True
