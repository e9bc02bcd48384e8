"""WebDataset shards: deterministic POSIX (ustar) tars plus DALI's v1.2 index.

Each sample is four consecutive members in `format.WDS_MEMBER_ORDER`: ``<key>.jpg``,
``<key>.cls`` (int32 LE, N), ``<key>.box`` (float32 LE, 4N: cx cy w h), ``<key>.json``
(compact metadata). `tarfile` writes and parses the archive; every header field is fixed
(mtime 0, uid/gid 0, no user/group names, mode 0o644), so the same records give the same bytes. The index ``<shard>.idx`` is produced
while writing and equals `wds2idx`'s output: ``v1.2 <n>`` then one line per sample of
``<ext> <data_offset> <size> <name>`` groups.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from packer.format import (
    META_FIELDS,
    WDS_BOX,
    WDS_CLASS,
    WDS_IMAGE,
    WDS_MEMBER_ORDER,
    WDS_META,
    FormatError,
    Record,
)
from packer.writers.base import (
    IndexedFileReader,
    IndexedFileWriter,
    TempFile,
    index_bytes,
    indexed_shard_size,
)

BLOCK = tarfile.BLOCKSIZE
INDEX_VERSION = "v1.2"


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular file's header with every field fixed, so the same records give the same bytes."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    ti.type = tarfile.REGTYPE
    return ti


def encode_meta(rec: Record) -> bytes:
    """The `<key>.json` member: compact JSON of `Record.meta()` in its fixed field order."""
    return json.dumps(rec.meta(), separators=(",", ":"), ensure_ascii=False).encode()


def _padded(n: int | np.ndarray) -> int | np.ndarray:
    """`n` rounded up to whole tar blocks."""
    return -(-n // BLOCK) * BLOCK


class Writer(IndexedFileWriter):
    """Streams samples into a tar (`tarfile`, ustar) and their index lines into a temp file."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._lines: TempFile | None = None
        try:
            self._lines = self._index_temp()
            self._tar = tarfile.TarFile(
                fileobj=self._data, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict",
                copybufsize=1 << 20,
            )
        except BaseException:
            self.abort()
            raise

    def add(self, rec: Record) -> None:
        self._check_open()
        members = (
            (WDS_IMAGE, rec.jpeg),
            (WDS_CLASS, rec.cls.astype("<i4").tobytes()),
            (WDS_BOX, rec.boxes.astype("<f4").tobytes()),
            (WDS_META, encode_meta(rec)),
        )
        line = []
        for ext, data in members:
            name = f"{rec.key}.{ext}"
            self._tar.addfile(_member(name, len(data)), io.BytesIO(data))
            line.append(f"{ext} {self._tar.offset - _padded(len(data))} {len(data)} {name}")  # data after header
        self._tar.members.clear()  # TarFile keeps every member for getmembers(); a writer needs none
        assert self._lines is not None
        self._lines.write((" ".join(line) + "\n").encode())
        self.num_samples += 1

    def _finalize(self) -> None:
        assert self._lines is not None
        self._tar.close()  # end-of-archive blocks, padded to a whole record (what GNU tar writes)
        self._data.finish()
        self._lines.finish()
        # the v1.2 header needs the sample count, known only now: header + the streamed lines
        self._idx = self._index_temp()
        self._idx.write(f"{INDEX_VERSION} {self.num_samples}\n".encode())
        with open(self._lines.tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                self._idx.write(chunk)
        self._idx.finish()
        self._lines.discard()

    def _temps(self) -> list[TempFile | None]:
        return [*super()._temps(), self._lines]


def decode_sample(members: Mapping[str, bytes], key: str, where: str = "sample") -> Record:
    """The Record of one sample from its member bytes by extension (`format.WDS_MEMBER_ORDER`;
    other entries, such as webdataset's ``__key__``, are ignored); FormatError if they do not
    hold this contract's sample `key`. `where` starts the error messages."""
    missing = [f"{key}.{ext}" for ext in WDS_MEMBER_ORDER if ext not in members]
    if missing:
        raise FormatError(f"{where}: member {missing[0]} missing")
    cls, box = members[WDS_CLASS], members[WDS_BOX]
    if len(cls) % 4 or len(box) != 4 * len(cls):
        raise FormatError(f"{where}: .cls has {len(cls)} bytes but .box has {len(box)} (want 4x)")
    try:
        meta = json.loads(members[WDS_META])
        fields = {k: meta[k] for k in META_FIELDS}
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{where}: bad .json metadata ({e})") from None
    if fields["key"] != key:
        raise FormatError(f"{where}: .json names key {fields['key']!r}")
    try:
        return Record(
            jpeg=members[WDS_IMAGE], cls=np.frombuffer(cls, dtype="<i4"), boxes=np.frombuffer(box, dtype="<f4"),
            **fields,
        )
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


class Reader(IndexedFileReader):
    """Reads a wds tar through its index (`tarfile` parses each sample's members); checks every
    member's name, offset and size against the index."""

    def _load_index(self, index: Path, shard_size: int) -> None:
        _, self.keys, self.members = _parse_index(*index_bytes(index), shard_size)
        self._ranges = _sample_ranges(self.members).tolist()  # plain ints: read() is per sample
        self._rows = self.members.tolist()

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, pos: int) -> Record:
        pos = self._check_pos(pos)
        key, where = self.keys[pos], f"{self.path}: sample {pos} ({self.keys[pos]})"
        start, size = self._ranges[pos]
        buf = os.pread(self._fd, size, start)
        if len(buf) != size:
            raise FormatError(f"{where}: truncated")
        expect = iter(zip(WDS_MEMBER_ORDER, self._rows[pos], strict=True))
        data: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(buf), mode="r:", encoding="utf-8", errors="strict") as tar:
                for ti in tar:
                    ext, (off, n) = next(expect, (None, (-1, -1)))
                    if ti.name != f"{key}.{ext}" or not ti.isreg() or start + ti.offset_data != off or ti.size != n:
                        raise FormatError(f"{where}: tar member {ti.name!r} does not match the index")
                    data[ext] = tar.extractfile(ti).read()  # type: ignore[union-attr]
        except tarfile.TarError as e:
            raise FormatError(f"{where}: bad tar member ({e})") from None
        return decode_sample(data, key, where)
    def __iter__(self) -> Iterator[Record]:
        for pos in range(len(self)):
            yield self.read(pos)


# ------------------------------------------------------------------------------ index


def _is_count(s: str) -> bool:
    return s.isascii() and s.isdigit() and len(s) <= 18


def _parse_index(data: bytes, where: str, shard_size: int | None) -> tuple[list[str], list[str], np.ndarray]:
    """A v1.2 index as (sample lines without newline, keys, int64 (n, members, 2) data offset and size).

    FormatError unless every sample has exactly the contract's members, in order, and all members
    lie back to back from offset 0 (one header block before each, data padded to whole blocks),
    ending within `shard_size` when given.
    """
    bad = FormatError(f"{where}: malformed index or it does not match its shard")
    try:
        lines = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise bad from None
    head = lines[0].split(" ")
    if lines[-1] or len(head) != 2 or head[0] != INDEX_VERSION or not _is_count(head[1]):
        raise bad
    lines = lines[1:-1]
    if int(head[1]) != len(lines):
        raise bad
    keys, rows = [], []
    for line in lines:
        tok = line.split(" ")
        key = tok[3].split(".", 1)[0] if len(tok) == 4 * len(WDS_MEMBER_ORDER) else ""
        quads = [tok[i : i + 4] for i in range(0, len(tok), 4)]
        if not key or [(q[0], q[3]) for q in quads] != [(e, f"{key}.{e}") for e in WDS_MEMBER_ORDER]:
            raise bad
        if not all(_is_count(q[1]) and _is_count(q[2]) for q in quads):
            raise bad
        keys.append(key)
        rows.append([(int(q[1]), int(q[2])) for q in quads])
    members = np.array(rows, dtype=np.int64).reshape(-1, len(WDS_MEMBER_ORDER), 2)
    heads = members[:, :, 0].reshape(-1) - BLOCK  # every member's header, in file order
    ends = _padded(members[:, :, 0].reshape(-1) + members[:, :, 1].reshape(-1))
    if len(heads) and (heads[0] != 0 or np.any(heads[1:] != ends[:-1])):
        raise bad
    if len(ends) and shard_size is not None and ends[-1] > shard_size:
        raise bad
    return lines, keys, members


def _sample_ranges(members: np.ndarray) -> np.ndarray:
    """int64 (n, 2): offset of each sample's first header and its size up to the next sample."""
    start = members[:, 0, 0] - BLOCK
    return np.stack([start, _padded(members[:, -1, 0] + members[:, -1, 1]) - start], axis=1)


def read_index(src: Path | str | bytes, shard_size: int | None = None, member: str | None = None) -> np.ndarray:
    """int64 (n, 2) from a shard's index file (its path, or its bytes): offset and size of each
    sample's tar bytes (headers and padding included; sample i+1 starts where i ends), or with
    `member` (one of `format.WDS_MEMBER_ORDER`) of that member's data in each sample.

    Checked against the shard: members back to back from offset 0, ending within `shard_size`
    (by default the size of the shard the index file names: its path without ``.idx``).
    FormatError if not.
    """
    if member is not None and member not in WDS_MEMBER_ORDER:
        raise ValueError(f"unknown member {member!r}: one of {', '.join(WDS_MEMBER_ORDER)}")
    data, where = index_bytes(src)
    _, _, members = _parse_index(data, where, indexed_shard_size(src, shard_size))
    return _sample_ranges(members) if member is None else members[:, WDS_MEMBER_ORDER.index(member)].copy()


def trim_index(src: Path | str | bytes, start: int, stop: int) -> bytes:
    """The index of samples ``[start, stop)`` only, offsets unchanged: DALI's reader given it reads
    just those samples of the whole tar."""
    lines, _, _ = _parse_index(*index_bytes(src), None)
    if not 0 <= start <= stop <= len(lines):
        raise ValueError(f"samples [{start}, {stop}) are not within the index's {len(lines)}")
    body = lines[start:stop]
    return (f"{INDEX_VERSION} {len(body)}\n" + "".join(b + "\n" for b in body)).encode()


def _split_name(name: str) -> tuple[str, str]:
    # wds2idx's rule: extension = everything after the first dot of the basename
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def make_index(path: Path) -> bytes:
    """Index bytes for an existing tar, as `wds2idx` computes them (regular files, grouped by key)."""
    samples: list[list[str]] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                base, ext = _split_name(m.name)
                if not base or base.endswith("/"):
                    continue
                entry = f"{ext} {m.offset_data} {m.size} {m.name}"
                if base != last:
                    samples.append([entry])
                    last = base
                else:
                    samples[-1].append(entry)
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a readable tar ({e})") from None
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return ("\n".join(lines) + "\n").encode()


def foreign_members(path: Path) -> list[str]:
    """Members packer never writes (links, folders, devices, names with a slash: `../x`, `/etc/x`),
    which readers and the index skip but `tar x` would create, maybe outside the folder."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [m.name for m in tar if not m.isreg() or "/" in m.name or m.name.startswith(".")]
    except tarfile.TarError:
        return []  # an unreadable tar is reported by the index and record checks


def dali_members() -> tuple[list[str], list]:
    """`ext` and `dtypes` for DALI's `fn.readers.webdataset`: image bytes, classes (int32), boxes
    (float32, 4 per box), the json meta (bytes). Imports DALI, so only the trainer side calls it."""
    from nvidia.dali import types

    return list(WDS_MEMBER_ORDER), [types.UINT8, types.INT32, types.FLOAT, types.UINT8]
