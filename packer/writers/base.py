"""Shard writer/reader interface shared by the three formats.

Writers stream into hidden temp files next to the final path and rename them into place
at `close()` (index first, shard last), so an interrupted write never leaves a shard that
looks complete. The shard's sha256 and size are computed as its bytes are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from packer.format import INDEX_SUFFIX, TEMP_MARK, FormatError, Record

_BUFSIZE = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # mkstemp creates 0600; shards should get the usual mode


def make_hidden_tmp(target: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a hidden temp file next to `target` with the normal file mode; return (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{TEMP_MARK}", suffix=suffix)
    os.fchmod(fd, FILE_MODE)
    return fd, Path(tmp)


@dataclass
class WrittenShard:
    """A finished shard: its file, its index file (None for lmdb), and checksums of the shard file."""

    path: Path
    index: Path | None
    num_samples: int
    bytes: int
    sha256: str


def index_path(path: Path) -> Path:
    """The index file of a shard: the shard's file name + `format.INDEX_SUFFIX`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def index_bytes(src: Path | str | bytes) -> tuple[bytes, str]:
    """An index file's bytes (`src` is its path, or already its bytes) and a name for messages."""
    if isinstance(src, bytes):
        return src, "index"
    try:
        return Path(src).read_bytes(), str(src)
    except FileNotFoundError:
        raise FormatError(f"{src}: index file not found") from None


def indexed_shard_size(src: Path | str | bytes, shard_size: int | None) -> int:
    """`shard_size`, or else the size of the shard that the index file `src` names (its path
    without `format.INDEX_SUFFIX`); FormatError if that shard is missing."""
    if shard_size is not None:
        return shard_size
    if isinstance(src, bytes) or not str(src).endswith(INDEX_SUFFIX):
        raise ValueError("shard_size is needed to check an index given as bytes or not named <shard>.idx")
    shard = Path(str(src)[: -len(INDEX_SUFFIX)])
    if not shard.is_file():
        raise FormatError(f"{shard}: shard not found")
    return shard.stat().st_size


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TempFile:
    """A hidden temp file in the target's folder; hashes and counts bytes as they are written."""

    def __init__(self, target: Path, hashed: bool = True):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = make_hidden_tmp(self.target)
        self.f = os.fdopen(fd, "wb", buffering=_BUFSIZE)
        self.size = 0
        self._hash = hashlib.sha256() if hashed else None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.f.write(data)
        self.size += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def tell(self) -> int:
        """Bytes written so far (the file position: writes only append)."""
        return self.size

    def hexdigest(self) -> str:
        assert self._hash is not None
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync (the file stays at its temp name)."""
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()

    def commit(self) -> None:
        """Rename into place (call after `finish`)."""
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        if not self.f.closed:
            with contextlib.suppress(OSError):
                self.f.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter(ABC):
    """Appends Records to one shard file (lmdb: one environment) and writes its index.

    Use as a context manager: leaving the block normally closes the shard, an exception
    aborts it (temp files removed, nothing left that looks complete).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.num_samples = 0
        self._result: WrittenShard | None = None
        self._aborted = False

    @abstractmethod
    def add(self, rec: Record) -> None:
        """Append one sample."""

    @abstractmethod
    def close(self) -> WrittenShard:
        """Finish the shard: fsync, write the index, rename temp files into place (index first)."""

    @abstractmethod
    def abort(self) -> None:
        """Remove the temp files; safe to call more than once."""

    def _check_open(self) -> None:
        if self._result is not None or self._aborted:
            raise RuntimeError(f"{self.path}: writer already {'closed' if self._result else 'aborted'}")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._result is None and not self._aborted:
            self.close()


class IndexedFileWriter(ShardWriter):
    """A shard file plus its index file, both at hidden temp names until `close`.

    Subclasses write `self._data` in `add`, open index temp files with `_index_temp`, implement
    `_finalize` (trailer, index contents; leaves `self._idx` finished) and extend `_temps` with
    any other temp file they hold.
    """

    def __init__(self, path: Path):
        super().__init__(path)
        self.index = index_path(self.path)
        self._data = TempFile(self.path)
        self._idx: TempFile | None = None

    @abstractmethod
    def _finalize(self) -> None:
        """Write what ends the shard and its index, fsync both (still at temp names)."""

    def _index_temp(self) -> TempFile:
        """A new temp file for the index (not hashed: the manifest records the shard's sha256 only)."""
        return TempFile(self.index, hashed=False)

    def _temps(self) -> list[TempFile | None]:
        """Every temp file this writer holds (removed by abort)."""
        return [self._data, self._idx]

    def close(self) -> WrittenShard:
        if self._result is not None:
            return self._result
        self._check_open()
        try:
            self._finalize()
            assert self._idx is not None
            self._idx.commit()  # index first: a shard never appears without its index
            self._data.commit()
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        self._result = WrittenShard(self.path, self.index, self.num_samples, self._data.size, self._data.hexdigest())
        return self._result

    def abort(self) -> None:
        if self._result is not None:
            return
        self._aborted = True
        for t in self._temps():
            if t is not None:
                t.discard()


class ShardReader(ABC):
    """Reads Records back from one shard; validates framing and record contents.

    Any mismatch raises `packer.format.FormatError` naming the shard and position.
    Random access uses positional reads, so a reader is safe to use after fork.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples (from the index file, or lmdb's count key)."""

    @abstractmethod
    def __iter__(self) -> Iterator[Record]:
        """Every record in order, parsed and validated."""

    @abstractmethod
    def read(self, pos: int) -> Record:
        """The record at position `pos` (0-based)."""

    @abstractmethod
    def close(self) -> None:
        """Release files / the environment."""

    def __getitem__(self, pos: int) -> Record:
        """`read(pos)`: map-style access, as a torch `Dataset` has it."""
        return self.read(pos)

    def _check_pos(self, pos: int) -> int:
        n = len(self)
        if not -n <= pos < n:
            raise IndexError(f"{self.path}: position {pos} out of range (0..{n - 1})")
        return pos % n

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class IndexedFileReader(ShardReader):
    """A shard file read through its index file with positional reads (tfrecord, wds).

    Subclasses parse the index in `_load_index`; FormatError if the shard is missing.
    """

    def __init__(self, path: Path):
        super().__init__(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: shard not found")
        self._load_index(index_path(self.path), self.path.stat().st_size)
        self._fd = os.open(self.path, os.O_RDONLY)

    @abstractmethod
    def _load_index(self, index: Path, shard_size: int) -> None:
        """Read and check the index file `index` of a shard of `shard_size` bytes."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
