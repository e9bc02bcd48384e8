"""WebDataset shards: deterministic POSIX (ustar) tars plus DALI's v1.2 index.

Each sample is four consecutive members in `format.WDS_MEMBER_ORDER`: ``<key>.jpg``,
``<key>.cls`` (int32 LE, N), ``<key>.box`` (float32 LE, 4N: cx cy w h), ``<key>.json``
(compact metadata). Headers are fixed (mtime 0, uid/gid 0, no user/group names, mode
0o644), so the same records give the same bytes. The index ``<shard>.idx`` is produced
while writing and equals `wds2idx`'s output: ``v1.2 <n>`` then one line per sample of
``<ext> <data_offset> <size> <name>`` groups.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from packer.format import WDS_BOX, WDS_CLASS, WDS_IMAGE, WDS_MEMBER_ORDER, WDS_META, FormatError, Record
from packer.writers.base import IndexedFileWriter, ShardReader, TempFile, index_path

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # tarfile/GNU tar pad archives to 20 blocks
INDEX_VERSION = "v1.2"
_META_FIELDS = ("key", "source", "height", "width", "orig_height", "orig_width")


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header for a regular file."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def encode_meta(rec: Record) -> bytes:
    """The `<key>.json` member: compact JSON of `Record.meta()` in its fixed field order."""
    return json.dumps(rec.meta(), separators=(",", ":"), ensure_ascii=False).encode()


def _pad(n: int) -> int:
    return -n % BLOCK


class Writer(IndexedFileWriter):
    """Streams samples into a tar and their index lines into a temp file."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.index = index_path(self.path)
        self._data = TempFile(self.path)
        self._lines: TempFile | None = None
        self._idx: TempFile | None = None
        try:
            self._lines = TempFile(self.index, hashed=False)
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
        parts, line = [], []
        off = self._data.size
        for ext, data in members:
            name = f"{rec.key}.{ext}"
            hdr = tar_header(name, len(data))
            off += len(hdr)
            line.append(f"{ext} {off} {len(data)} {name}")
            off += len(data) + _pad(len(data))
            parts += (hdr, data, bytes(_pad(len(data))))
        self._data.write(b"".join(parts))
        assert self._lines is not None
        self._lines.write((" ".join(line) + "\n").encode())
        self.num_samples += 1

    def _finalize(self) -> None:
        assert self._lines is not None
        end = bytes(2 * BLOCK)  # end-of-archive marker, then pad to a whole record
        self._data.write(end + bytes(-(self._data.size + len(end)) % RECORD))
        self._data.finish()
        self._lines.finish()
        # the v1.2 header needs the sample count, known only now: header + the streamed lines
        self._idx = TempFile(self.index, hashed=False)
        self._idx.write(f"{INDEX_VERSION} {self.num_samples}\n".encode())
        with open(self._lines.tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                self._idx.write(chunk)
        self._idx.finish()
        self._lines.discard()

    def _temps(self) -> list[TempFile | None]:
        return [self._data, self._lines, self._idx]


def _parse_index(path: Path, shard: Path, size: int) -> list[tuple[str, int, int]]:
    """Per sample: (key, first header offset, end of last member's data)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FormatError(f"{shard}: index file {path.name} not found") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path}: index is not text") from None
    bad = FormatError(f"{path}: malformed index or it does not match {shard.name}")
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise bad
    out = []
    for line in lines[1:]:
        tok = line.split(" ")
        if len(tok) != 4 * len(WDS_MEMBER_ORDER):
            raise bad
        key = tok[3].split(".", 1)[0]
        prev_end = None
        for i, ext in enumerate(WDS_MEMBER_ORDER):
            e, off, n, name = tok[4 * i : 4 * i + 4]
            if e != ext or name != f"{key}.{ext}" or not off.isdigit() or not n.isdigit() or int(off) % BLOCK:
                raise bad
            if prev_end is not None and int(off) != prev_end + _pad(prev_end) + BLOCK:
                raise bad  # members of a sample are consecutive
            prev_end = int(off) + int(n)
        start = int(tok[1]) - BLOCK
        if out and start != out[-1][2] + _pad(out[-1][2]) or not out and start != 0 or prev_end > size:
            raise bad
        out.append((key, start, prev_end))
    return out


class Reader(ShardReader):
    """Reads a wds tar through its index; checks every member's tar header against it."""

    def __init__(self, path: Path):
        super().__init__(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: shard not found")
        self.samples = _parse_index(index_path(self.path), self.path, self.path.stat().st_size)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, pos: int) -> Record:
        pos = self._check_pos(pos)
        key, start, end = self.samples[pos]
        buf = os.pread(self._fd, end - start, start)
        where = f"{self.path}: sample {pos} ({key})"
        if len(buf) != end - start:
            raise FormatError(f"{where}: truncated")
        data: dict[str, bytes] = {}
        o = 0
        for ext in WDS_MEMBER_ORDER:
            try:
                ti = tarfile.TarInfo.frombuf(buf[o : o + BLOCK], "utf-8", "strict")
            except tarfile.HeaderError as e:
                raise FormatError(f"{where}: bad tar header for .{ext}: {e}") from None
            if ti.name != f"{key}.{ext}" or not ti.isreg():
                raise FormatError(f"{where}: member {key}.{ext} missing (found {ti.name!r})")
            o += BLOCK
            data[ext] = buf[o : o + ti.size]
            data_end = o + ti.size
            o = data_end + _pad(ti.size)
        if data_end != end - start:
            raise FormatError(f"{where}: member sizes do not match the index")
        return self._decode(data, key, where)

    @staticmethod
    def _decode(data: dict[str, bytes], key: str, where: str) -> Record:
        cls, box = data[WDS_CLASS], data[WDS_BOX]
        if len(cls) % 4 or len(box) != 4 * len(cls):
            raise FormatError(f"{where}: .cls has {len(cls)} bytes but .box has {len(box)} (want 4x)")
        try:
            meta = json.loads(data[WDS_META])
            fields = {k: meta[k] for k in _META_FIELDS}
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{where}: bad .json metadata ({e})") from None
        if fields["key"] != key:
            raise FormatError(f"{where}: .json names key {fields['key']!r}")
        try:
            return Record(
                jpeg=data[WDS_IMAGE],
                cls=np.frombuffer(cls, dtype="<i4"),
                boxes=np.frombuffer(box, dtype="<f4"),
                **fields,
            )
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None

    def __iter__(self) -> Iterator[Record]:
        for pos in range(len(self)):
            yield self.read(pos)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
