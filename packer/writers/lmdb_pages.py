"""LMDB's on-disk pages, read by packer itself: `normalize` makes the writer's output a function
of the records only; `check_pages` keeps a reader from following a page or node pointer out of
the file (LMDB memory-maps it and trusts it: such a read kills the process with SIGBUS)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from packer.format import FormatError, sha256_file

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




# MDB_meta after the 16-byte page header: magic, version, address, mapsize, then two MDB_db of 48
# bytes (the root page number last), then mm_last_pg and mm_txnid
_ROOTS = (16 + 24 + 40, 16 + 24 + 48 + 40)  # FREE_DBI's and the main DB's md_root
_LAST_TXN = struct.Struct("<QQ")  # mm_last_pg, mm_txnid
_LAST_TXN_AT = 16 + 24 + 96
_P_INVALID = (1 << 64) - 1  # the root of an empty DB


def check_pages(path: Path) -> None:
    """FormatError unless every page and node a read can reach stays inside the file.

    LMDB maps the file and follows its pointers unchecked: a hostile file whose checksums were
    recomputed (or a damaged one) can send a read past the end of the map, and the process dies
    of SIGBUS with no message. So the layout packer writes is required exactly: both meta pages
    of one page size, the newer one's last page inside the file, the main DB plain (no flags, no
    fixed key size); then every page up to that last one (overflow runs by their first page):
    node pages flagged branch or leaf only, holding nodes that stay inside them, branch
    children and the roots on node pages, big values inside their overflow run.
    """
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        psize = _page_size(os.pread(fd, 64, 0), path, size) if size >= 64 else 0
        if psize == 0 or size < 2 * psize:
            raise FormatError(f"{path}: not an LMDB file ({size} bytes)")
        metas = [os.pread(fd, _LAST_TXN_AT + _LAST_TXN.size, i * psize) for i in (0, 1)]
        if (metas[0][16:24], metas[0][40:44]) != (metas[1][16:24], metas[1][40:44]):
            # magic, version, page size: LMDB takes the page size from the newer meta
            raise FormatError(f"{path}: damaged LMDB file (its two meta pages disagree)")
        meta = max(metas, key=lambda m: _LAST_TXN.unpack_from(m, _LAST_TXN_AT)[1])
        # LMDB maps max(10 MiB, last page + 1) and never reads a page past the last: the walk stops there too
        pages = _LAST_TXN.unpack_from(meta, _LAST_TXN_AT)[0] + 1
        if not 2 <= pages <= size // psize or meta[88:94] != bytes(6):
            raise FormatError(f"{path}: damaged LMDB file (its meta page does not describe this file)")
        node_pages, runs, refs = _walk(fd, psize, pages, path)
    finally:
        os.close(fd)
    roots = [int.from_bytes(meta[r : r + 8], "little") for r in _ROOTS]
    for kind, target, dsize in [("child", r, 0) for r in roots if r != _P_INVALID] + refs:
        if kind == "child" and target not in node_pages:
            raise FormatError(f"{path}: damaged LMDB file (a pointer to page {target}, not a node page)")
        if kind == "big" and (target not in runs or 16 + dsize > runs[target] * psize):
            raise FormatError(f"{path}: damaged LMDB file (a value of {dsize} bytes outside its pages)")


def _walk(fd: int, psize: int, npages: int, path: Path) -> tuple[set[int], dict[int, int], list]:
    """(node pages, overflow run lengths by first page, what the nodes point at) of pages 2.."""
    node_pages: set[int] = set()
    runs: dict[int, int] = {}
    refs: list[tuple[str, int, int]] = []
    pgno = 2
    while pgno < npages:
        page = os.pread(fd, psize, pgno * psize)
        flags = _PAGE_HDR.unpack_from(page)[2]
        if flags == _P_OVERFLOW:
            n = struct.unpack_from("<I", page, 12)[0]
            if n < 1 or pgno + n > npages:
                raise FormatError(f"{path}: damaged LMDB file (overflow run of {n} pages at page {pgno})")
            runs[pgno] = n
            pgno += n
            continue
        if flags not in (_P_BRANCH, _P_LEAF):  # LMDB tests branch first: mixed flags would mislead it
            raise FormatError(f"{path}: damaged LMDB file (page {pgno} has flags {flags:#x})")
        refs += _node_refs(page, flags == _P_LEAF, psize, pgno, path)
        node_pages.add(pgno)
        pgno += 1
    return node_pages, runs, refs


def _node_refs(page: bytes, leaf: bool, psize: int, pgno: int, path: Path) -> list[tuple[str, int, int]]:
    """The pages a branch/leaf page's nodes point at; FormatError if a node leaves the page."""
    lower, upper = _PAGE_HDR.unpack_from(page)[3:5]
    bad = FormatError(f"{path}: damaged LMDB file (a node outside page {pgno})")
    if not 16 + (2 if leaf else 4) <= lower <= upper <= psize or lower % 2:  # LMDB reads node 0 (and
        raise bad  # a branch's last) without looking: at least one node, two on a branch page
    out = []
    for i in range(16, lower, 2):
        ptr = int.from_bytes(page[i : i + 2], "little")
        if not upper <= ptr <= psize - 8:
            raise bad
        lo, hi, nflags, ksize = _NODE.unpack_from(page, ptr)
        if not leaf:
            out.append(("child", lo | hi << 16 | nflags << 32, 0))
            end = ptr + 8 + ksize
        elif nflags == _F_BIGDATA:
            out.append(("big", int.from_bytes(page[ptr + 8 + ksize : ptr + 16 + ksize], "little"), lo | hi << 16))
            end = ptr + 16 + ksize
        elif nflags == 0:
            end = ptr + 8 + ksize + (lo | hi << 16)
        else:  # sub-databases and duplicates: not a layout packer writes
            raise FormatError(f"{path}: LMDB node flags {nflags:#x} on page {pgno}: not packer's layout")
        if end > psize:
            raise bad
    return out
