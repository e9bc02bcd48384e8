"""Records of a packed split by (shard, position), in whichever format it was packed.

`RecordSource.jpeg_at` is the hot path of the torch loader: the JPEG bytes of one sample, read
by index (WebDataset: one ``pread`` of exactly the JPEG member, its offset and size from the
shard's index file; TFRecord/LMDB: the record at that position). Labels never come from here
but from the split's label arrays. `segment` streams a run of records sequentially (WebDataset
on network storage, one ranged read per run).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import lmdb
import numpy as np
from torch.utils.data import Dataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from packer.format import (
    WDS_BOX,
    WDS_CLASS,
    WDS_IMAGE,
    WDS_META,
    FormatError,
    Record,
    decode_lmdb_record,
    lmdb_key,
)
from trainer.data.common import SplitData
from trainer.data.split import Segment

MAX_OPEN_SHARDS = 64  # shard files a process keeps open for reads by index (least recently used closed)


class LmdbRecords(Dataset):
    """Map-style access to a packed LMDB split: ``ds[i]`` is the Record of sample i."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def _txn(self) -> lmdb.Transaction:
        if self._env is None or self._pid != os.getpid():  # never share an environment across fork
            self._env = lmdb.open(str(self.path), subdir=False, readonly=True, lock=False, readahead=False,
                                  meminit=False, max_readers=64)
            self._pid = os.getpid()
        return self._env.begin(buffers=True)

    def __len__(self) -> int:
        with self._txn() as t:
            return int(bytes(t.get(b"__count__")))

    def __getitem__(self, i: int) -> Record:
        with self._txn() as t:
            buf = t.get(lmdb_key(i))
            if buf is None:
                raise FormatError(f"{self.path}: sample {i} missing")
            return decode_lmdb_record(buf)


def _wds_index(text: str) -> list[tuple[int, int]]:
    """(header offset of the sample's first member, end of its last member's data) per sample."""
    lines = text.splitlines()
    out = []
    for line in lines[1:]:
        parts = line.split()
        offs = [int(parts[i + 1]) for i in range(0, len(parts), 4)]
        sizes = [int(parts[i + 2]) for i in range(0, len(parts), 4)]
        out.append((offs[0] - 512, offs[-1] + sizes[-1]))
    return out


def _wds_jpeg_index(text: str) -> np.ndarray:
    """int64 (n, 2): offset and size of each sample's image member (from the shard's index file)."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        for i in range(0, len(parts), 4):
            if parts[i] == WDS_IMAGE:
                out.append((int(parts[i + 1]), int(parts[i + 2])))
                break
        else:
            out.append((-1, 0))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


class _Window(io.RawIOBase):
    """At most `length` bytes of an open binary file from its current position, so a tar
    stream can start mid-archive and stop at a sample boundary (local or remote file)."""

    def __init__(self, f: IO[bytes], length: int):
        self._f = f
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - buffer protocol
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(memoryview(b)[:n])  # local files and fsspec files both fill in place
        self._left -= got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _wds_record(sample: dict) -> Record:
    meta = json.loads(sample[WDS_META])
    return Record(
        key=meta["key"], source=meta["source"], jpeg=sample[WDS_IMAGE], height=meta["height"],
        width=meta["width"], orig_height=meta["orig_height"], orig_width=meta["orig_width"],
        cls=np.frombuffer(sample[WDS_CLASS], dtype="<i4"), boxes=np.frombuffer(sample[WDS_BOX], dtype="<f4"),
    )


class RecordSource:
    """Reads records of one split by (shard, position), in whichever format it was packed.

    Opened lazily in each worker. `segment` yields ``(pos, Record | Exception)`` so one bad
    record never stops the stream. With `stream` (a WebDataset split on network storage) tar
    members are read straight from the remote shards: each segment is one sequential read of
    just its byte range (the index file, a few KB, gives the offsets).
    """

    def __init__(self, data: SplitData, stream: bool = False):
        self.fmt = data.fmt
        self.paths = [data.shard_path(i) for i in range(len(data.info.shards))]
        self.index_paths = [data.index_path(i) if self.fmt != "lmdb" else None for i in range(len(self.paths))]
        self.stream = stream
        if stream and (data.url is None or self.fmt != "wds"):
            raise ValueError("streaming reads WebDataset shards on network storage only")
        self.url, self.storage_options = data.url, data.storage_options
        self.rels = [(sh.path, sh.index) for sh in data.info.shards]
        self._open: dict[int, object] = {}
        self._jpeg_index: dict[int, tuple[int, np.ndarray]] = {}  # shard -> (fd, offsets/sizes), per process
        self._fs: tuple[int, object, str] | None = None

    def _remote(self) -> tuple[object, str]:
        """This process's filesystem object (never shared across fork: its sessions would be)."""
        if self._fs is None or self._fs[0] != os.getpid():
            from packer.remote import get_fs

            fs, root = get_fs(self.url, self.storage_options)
            self._fs = (os.getpid(), fs, root)
        return self._fs[1], self._fs[2]

    def _reader(self, shard: int):  # noqa: ANN202
        r = self._open.get(shard)
        if r is None:
            if self.fmt == "lmdb":
                r = LmdbRecords(self.paths[shard])
            elif self.fmt == "wds":
                if self.stream:
                    from packer.remote import join, read_bytes

                    fs, root = self._remote()
                    r = _wds_index(read_bytes(fs, join(root, self.rels[shard][1])).decode())
                else:
                    r = _wds_index(self.index_paths[shard].read_text())
            else:
                from packer.writers import open_reader

                r = open_reader("tfrecord", self.paths[shard])
            self._open[shard] = r
        return r

    def jpeg_at(self, shard: int, pos: int) -> bytes:
        """The image bytes of record `pos` of shard `shard` (local data; any damage raises)."""
        if self.fmt != "wds" or self.stream:
            return self.read(shard, pos).jpeg
        got = self._jpeg_index.pop(shard, None)  # re-inserted last: the dict is an LRU of open shards
        if got is None:
            if len(self._jpeg_index) >= MAX_OPEN_SHARDS:  # never run out of file descriptors
                os.close(self._jpeg_index.pop(next(iter(self._jpeg_index)))[0])
            fd = os.open(self.paths[shard], os.O_RDONLY)
            try:
                got = (fd, _wds_jpeg_index(self.index_paths[shard].read_text()))
            except BaseException:
                os.close(fd)
                raise
        self._jpeg_index[shard] = got
        off, size = (int(v) for v in got[1][pos])
        if off < 0:
            raise FormatError(f"{self.paths[shard]}: record {pos} has no .{WDS_IMAGE} member")
        data = os.pread(got[0], size, off)
        if len(data) != size:
            raise FormatError(f"{self.paths[shard]}: record {pos} is cut short ({len(data)} of {size} bytes)")
        return data

    def forget_files(self) -> None:
        """Close the file handles this process opened (they are never shared across fork)."""
        for fd, _ in self._jpeg_index.values():
            os.close(fd)
        self._jpeg_index.clear()

    def read(self, shard: int, pos: int) -> Record:
        r = self._reader(shard)
        if self.fmt == "lmdb":
            return r[pos]
        if self.fmt == "wds":
            return next(iter(self._wds_stream(shard, pos, pos + 1)))
        return r.read(pos)

    def _open_at(self, shard: int, offset: int) -> IO[bytes]:
        if not self.stream:
            f = open(self.paths[shard], "rb", buffering=0)  # noqa: SIM115 - closed by _Window
            f.seek(offset)
            return f
        from packer.remote import CHUNK, join, open_stream, retry

        if offset == 0:  # from the start: one streaming GET (http) / sequential ranges (object stores)
            return open_stream(join(self.url, self.rels[shard][0]), self.storage_options)
        fs, root = self._remote()
        f = retry(lambda: fs.open(join(root, self.rels[shard][0]), "rb", block_size=CHUNK, cache_type="readahead"))
        f.seek(offset)
        return f

    def _wds_stream(self, shard: int, start: int, stop: int) -> Iterator[Record]:
        idx = self._reader(shard)
        begin, end = idx[start][0], -(-idx[stop - 1][1] // 512) * 512  # end padded to a block
        win = _Window(self._open_at(shard, begin), end - begin)
        name = self.rels[shard][0] if self.stream else str(self.paths[shard])
        try:
            stream = io.BufferedReader(win, buffer_size=1 << 20)
            files = tar_file_expander([{"url": name, "stream": stream}])
            for sample in group_by_keys(files):
                yield _wds_record(sample)
        finally:
            win.close()

    def segment(self, seg: Segment) -> Iterator[tuple[int, Record | Exception]]:
        if self.fmt != "wds":
            for pos in range(seg.start, seg.stop):
                try:
                    yield pos, self.read(seg.shard, pos)
                except Exception as e:  # noqa: BLE001 - any damage to one record is that record's problem
                    yield pos, e
            return
        pos = seg.start
        try:
            for rec in self._wds_stream(seg.shard, seg.start, seg.stop):
                if pos >= seg.stop:
                    break
                yield pos, rec
                pos += 1
        except Exception as e:  # noqa: BLE001 - a damaged tar member: fall back to one-by-one reads
            yield pos, e
            pos += 1
        while pos < seg.stop:  # after damage (or a short stream) read the rest one at a time
            try:
                yield pos, self.read(seg.shard, pos)
            except Exception as e:  # noqa: BLE001
                yield pos, e
            pos += 1
