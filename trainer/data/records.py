"""Records of a packed split by (shard, position), in whichever format it was packed.

`RecordSource.jpeg_at` is the hot path of the torch loader: the JPEG bytes of one sample, read
by index (WebDataset: one ``pread`` of exactly the JPEG member, its offset and size from the
shard's index file; TFRecord/LMDB: the record at that position). Labels never come from here
but from the split's label arrays. `segment` streams a run of records sequentially (WebDataset
on network storage, one ranged read per run).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from packer.format import WDS_IMAGE, FormatError, Record
from packer.storage.files import CHUNK, open_stream, read_bytes
from packer.storage.fs import OversizeError, get_fs, join, retry
from packer.writers import ShardReader, open_reader, wds
from trainer.data.common import SplitData
from trainer.data.split import Segment

MAX_OPEN_SHARDS = 64  # shard files a process keeps open for reads by index (least recently used closed)


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
        self.sizes = [sh.bytes for sh in data.info.shards]  # what the manifest says each shard holds
        self._open: dict[int, ShardReader | np.ndarray] = {}
        self._jpeg_index: dict[int, tuple[int, np.ndarray]] = {}  # shard -> (fd, offsets/sizes), per process
        self._fs: tuple[int, object, str] | None = None

    def _remote(self) -> tuple[object, str]:
        """This process's filesystem object (never shared across fork: its sessions would be)."""
        if self._fs is None or self._fs[0] != os.getpid():
            fs, root = get_fs(self.url, self.storage_options)
            self._fs = (os.getpid(), fs, root)
        return self._fs[1], self._fs[2]

    def _reader(self, shard: int) -> ShardReader | np.ndarray:
        """The shard's reader (tfrecord, lmdb) or, for wds, its sample ranges (`wds.read_index`)."""
        r = self._open.get(shard)
        if r is None:
            if self.fmt != "wds":
                r = open_reader(self.fmt, self.paths[shard])
            elif self.stream:
                fs, root = self._remote()
                data = read_bytes(fs, join(root, self.rels[shard][1]), limit=self.sizes[shard])
                if len(data) > self.sizes[shard]:  # an index is far smaller than its shard
                    raise OversizeError(f"{self.rels[shard][1]}: longer than its shard; the index is damaged")
                r = wds.read_index(data, self.sizes[shard])
            else:
                r = wds.read_index(self.index_paths[shard], os.path.getsize(self.paths[shard]))
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
                got = (fd, wds.read_index(self.index_paths[shard], os.fstat(fd).st_size, member=WDS_IMAGE))
            except BaseException:
                os.close(fd)
                raise
        self._jpeg_index[shard] = got
        off, size = (int(v) for v in got[1][pos])
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
        if self.fmt == "wds":
            return next(iter(self._wds_stream(shard, pos, pos + 1)))
        return self._reader(shard)[pos]

    def _open_at(self, shard: int, offset: int) -> IO[bytes]:
        if not self.stream:
            f = open(self.paths[shard], "rb", buffering=0)  # noqa: SIM115 - closed by _Window
            f.seek(offset)
            return f
        if offset == 0:  # from the start: one streaming GET (http) / sequential ranges (object stores)
            return open_stream(join(self.url, self.rels[shard][0]), self.storage_options)
        fs, root = self._remote()
        f = retry(lambda: fs.open(join(root, self.rels[shard][0]), "rb", block_size=CHUNK, cache_type="readahead"))
        f.seek(offset)
        return f

    def _wds_stream(self, shard: int, start: int, stop: int) -> Iterator[Record]:
        idx = self._reader(shard)
        begin, end = int(idx[start, 0]), int(idx[stop - 1].sum())  # sample ranges end on a tar block
        win = _Window(self._open_at(shard, begin), end - begin)
        name = self.rels[shard][0] if self.stream else str(self.paths[shard])
        try:
            stream = io.BufferedReader(win, buffer_size=1 << 20)
            files = tar_file_expander([{"url": name, "stream": stream}])
            for sample in group_by_keys(files):
                key = sample["__key__"]
                yield wds.decode_sample(sample, key, f"{name}: sample {key}")
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
