"""TFRecord shards of `tf.train.Example`, encoded and parsed without TensorFlow.

Framing per record (little-endian): ``u64 len | u32 masked_crc32c(len) | data | u32
masked_crc32c(data)``. The Example protobuf is hand-encoded with its feature map in sorted
key order, which is what TensorFlow's deterministic serialization produces. The index
``<shard>.idx`` has one ``"<offset> <size>\\n"`` line per record, as DALI's `tfrecord2idx`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np

from packer.format import (
    TF_BBOX,
    TF_CLASS,
    TF_HEIGHT,
    TF_IMAGE,
    TF_KEY,
    TF_ORIG_HEIGHT,
    TF_ORIG_WIDTH,
    TF_SOURCE,
    TF_WIDTH,
    FormatError,
    Record,
)
from packer.writers.base import IndexedFileWriter, ShardReader, TempFile, index_path

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8

# protobuf wire tags: field number << 3 | wire type (2 = length-delimited, 0 = varint, 5 = fixed32)
_LEN1, _LEN2 = 0x0A, 0x12  # field 1/2, length-delimited
# Feature.kind: 1 bytes_list, 2 float_list, 3 int64_list
_BYTES, _FLOAT, _INT64 = 1, 2, 3

_FEATURES = {  # name -> kind; every one present in every record
    TF_IMAGE: _BYTES,
    TF_KEY: _BYTES,
    TF_SOURCE: _BYTES,
    TF_HEIGHT: _INT64,
    TF_WIDTH: _INT64,
    TF_ORIG_HEIGHT: _INT64,
    TF_ORIG_WIDTH: _INT64,
    TF_CLASS: _INT64,
    TF_BBOX: _FLOAT,
}
_ORDER = tuple(sorted(_FEATURES))  # TensorFlow's deterministic map order


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC-32C."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # protobuf int64: two's complement, 10 bytes
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _head(tag: int, n: int) -> bytes:
    """Tag and length of a length-delimited field (tags here are all < 128)."""
    return bytes((tag,)) + _varint(n)


def _packed_int64(values: np.ndarray) -> bytes:
    if len(values) and values.min() >= 0 and values.max() < 0x80:
        return values.astype(np.uint8).tobytes()  # one byte per varint: the common case
    return b"".join(_varint(int(v)) for v in values)


def _feature(kind: int, value: bytes | int | np.ndarray) -> tuple[list[bytes], int]:
    """A `Feature` message as chunks plus its length (chunks avoid copying the JPEG per nesting level)."""
    if kind == _BYTES:
        payload = value  # a one-element BytesList is always emitted, even for b""
    elif kind == _INT64:
        payload = _packed_int64(np.atleast_1d(np.asarray(value, dtype=np.int64)))
    else:
        payload = np.asarray(value, dtype="<f4").tobytes()
    inner: list[bytes] = [_head(_LEN1, len(payload)), payload] if payload or kind == _BYTES else []  # type: ignore[list-item]
    n = sum(len(c) for c in inner)
    head = _head((kind << 3) | 2, n)
    return [head, *inner], len(head) + n


# encoded map-entry key fields, computed once
_KEY_FIELDS = {name: _head(_LEN1, len(name.encode())) + name.encode() for name in _FEATURES}


def encode_example_chunks(rec: Record) -> list[bytes]:
    """`encode_example` as a list of chunks whose concatenation is the serialized Example."""
    values = {
        TF_IMAGE: rec.jpeg,
        TF_KEY: rec.key.encode(),
        TF_SOURCE: rec.source.encode(),
        TF_HEIGHT: rec.height,
        TF_WIDTH: rec.width,
        TF_ORIG_HEIGHT: rec.orig_height,
        TF_ORIG_WIDTH: rec.orig_width,
        TF_CLASS: rec.cls,
        TF_BBOX: rec.boxes,
    }
    chunks: list[bytes] = []
    total = 0
    for name in _ORDER:  # Features.feature map entries: {1: key, 2: Feature}
        fchunks, flen = _feature(_FEATURES[name], values[name])
        key, vhead = _KEY_FIELDS[name], _head(_LEN2, flen)
        elen = len(key) + len(vhead) + flen
        ehead = _head(_LEN1, elen)
        chunks += [ehead, key, vhead, *fchunks]
        total += len(ehead) + elen
    return [_head(_LEN1, total), *chunks]  # Example.features


def encode_example(rec: Record) -> bytes:
    """Serialize `rec` as a `tf.train.Example` (same bytes as TF's deterministic serialization)."""
    return b"".join(encode_example_chunks(rec))


def frame(data: bytes) -> bytes:
    """One framed TFRecord around `data`."""
    n = _U64.pack(len(data))
    return b"".join((n, _U32.pack(masked_crc(n)), data, _U32.pack(masked_crc(data))))


# ------------------------------------------------------------------------------ parsing


def _read_varint(buf: memoryview, o: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if o >= len(buf) or shift > 63:
            raise FormatError("truncated or overlong varint")
        b = buf[o]
        o += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, o
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, payload) of a protobuf message; skips nothing silently."""
    o, end = 0, len(buf)
    while o < end:
        tag, o = _read_varint(buf, o)
        num, wt = tag >> 3, tag & 7
        if wt == 2:
            n, o = _read_varint(buf, o)
            if o + n > end:
                raise FormatError("length-delimited field runs past its message")
            yield num, wt, buf[o : o + n]
            o += n
        elif wt == 0:
            v, o = _read_varint(buf, o)
            yield num, wt, v
        elif wt == 5:
            if o + 4 > end:
                raise FormatError("truncated fixed32 field")
            yield num, wt, buf[o : o + 4]
            o += 4
        elif wt == 1:
            if o + 8 > end:
                raise FormatError("truncated fixed64 field")
            yield num, wt, buf[o : o + 8]
            o += 8
        else:
            raise FormatError(f"unsupported protobuf wire type {wt}")


def _int64s(buf: memoryview) -> list[int]:
    out: list[int] = []
    for num, wt, v in _fields(buf):
        if num != 1:
            continue
        if wt == 0:
            out.append(v)  # type: ignore[arg-type]
        elif wt == 2:
            p = v  # packed
            if all(b < 0x80 for b in p):  # type: ignore[union-attr]
                out.extend(p)  # type: ignore[arg-type]
                continue
            o = 0
            while o < len(p):  # type: ignore[arg-type]
                x, o = _read_varint(p, o)  # type: ignore[arg-type]
                out.append(x)
        else:
            raise FormatError("bad Int64List encoding")
    return [x - (1 << 64) if x >= 1 << 63 else x for x in out]


def _floats(buf: memoryview) -> np.ndarray:
    parts: list[bytes] = []
    for num, wt, v in _fields(buf):
        if num != 1:
            continue
        if wt in (2, 5):
            if len(v) % 4:  # type: ignore[arg-type]
                raise FormatError("FloatList length is not a multiple of 4")
            parts.append(bytes(v))  # type: ignore[arg-type]
        else:
            raise FormatError("bad FloatList encoding")
    return np.frombuffer(b"".join(parts), dtype="<f4").astype(np.float32)


def _bytes_list(buf: memoryview) -> list[bytes]:
    out = []
    for num, wt, v in _fields(buf):
        if num == 1:
            if wt != 2:
                raise FormatError("bad BytesList encoding")
            out.append(bytes(v))  # type: ignore[arg-type]
    return out


def decode_example(data: bytes | memoryview) -> Record:
    """Parse a serialized `tf.train.Example` written by `encode_example` into a Record."""
    feats: dict[str, tuple[int, memoryview]] = {}
    for num, wt, features in _fields(memoryview(data)):
        if num != 1 or wt != 2:
            continue
        for fnum, fwt, entry in _fields(features):  # type: ignore[arg-type]
            if fnum != 1 or fwt != 2:
                continue
            name, feature = None, memoryview(b"")
            for enum, ewt, ev in _fields(entry):  # type: ignore[arg-type]
                if enum == 1 and ewt == 2:
                    name = bytes(ev).decode()  # type: ignore[arg-type]
                elif enum == 2 and ewt == 2:
                    feature = ev  # type: ignore[assignment]
            kind, payload = 0, memoryview(b"")
            for knum, kwt, kv in _fields(feature):
                if kwt == 2 and knum in (_BYTES, _FLOAT, _INT64):
                    kind, payload = knum, kv  # type: ignore[assignment]
            if name is not None:
                feats[name] = (kind, payload)
    for name, kind in _FEATURES.items():
        if name not in feats:
            raise FormatError(f"feature {name!r} missing")
        if feats[name][0] != kind:
            raise FormatError(f"feature {name!r} has the wrong type")

    def one(name: str) -> bytes | int:
        kind, payload = feats[name]
        vals = _bytes_list(payload) if kind == _BYTES else _int64s(payload)
        if len(vals) != 1:
            raise FormatError(f"feature {name!r} has {len(vals)} values, expected 1")
        return vals[0]

    cls = np.asarray(_int64s(feats[TF_CLASS][1]), dtype=np.int64)
    boxes = _floats(feats[TF_BBOX][1])
    if len(boxes) != 4 * len(cls):
        raise FormatError(f"{len(cls)} classes but {len(boxes)} box values (expected {4 * len(cls)})")
    if len(cls) and (cls.min() < np.iinfo(np.int32).min or cls.max() > np.iinfo(np.int32).max):
        raise FormatError("class id outside int32")
    try:
        return Record(
            key=one(TF_KEY).decode(),  # type: ignore[union-attr]
            source=one(TF_SOURCE).decode(),  # type: ignore[union-attr]
            jpeg=one(TF_IMAGE),  # type: ignore[arg-type]
            height=one(TF_HEIGHT),  # type: ignore[arg-type]
            width=one(TF_WIDTH),  # type: ignore[arg-type]
            orig_height=one(TF_ORIG_HEIGHT),  # type: ignore[arg-type]
            orig_width=one(TF_ORIG_WIDTH),  # type: ignore[arg-type]
            cls=cls,
            boxes=boxes,
        )
    except UnicodeDecodeError as e:
        raise FormatError(f"key/source is not UTF-8: {e}") from e


# ------------------------------------------------------------------------ writer/reader


class Writer(IndexedFileWriter):
    """Streams framed Examples into `<shard>` and `"<offset> <size>"` lines into `<shard>.idx`."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.index = index_path(self.path)
        self._data = TempFile(self.path)
        try:
            self._idx = TempFile(self.index, hashed=False)
        except BaseException:
            self._data.discard()
            raise

    def add(self, rec: Record) -> None:
        self._check_open()
        data = b"".join(encode_example_chunks(rec))
        n = _U64.pack(len(data))
        offset = self._data.size
        self._data.write(n + _U32.pack(masked_crc(n)))
        self._data.write(data)
        self._data.write(_U32.pack(masked_crc(data)))
        self._idx.write(f"{offset} {len(data) + 16}\n".encode())
        self.num_samples += 1

    def _finalize(self) -> None:
        self._data.finish()
        self._idx.finish()

    def _temps(self) -> list[TempFile | None]:
        return [self._data, self._idx]


def _parse_index(path: Path, shard: Path) -> np.ndarray:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{shard}: index file {path.name} not found") from None
    try:
        arr = np.array([line.split() for line in text.splitlines()], dtype=np.int64).reshape(-1, 2)
    except ValueError:
        raise FormatError(f"{path}: malformed index (want '<offset> <size>' lines)") from None
    if text and not text.endswith(b"\n"):
        raise FormatError(f"{path}: malformed index (last line not terminated)")
    return arr


class Reader(ShardReader):
    """Reads a TFRecord shard with its `.idx`; checks both CRCs of every record."""

    def __init__(self, path: Path):
        super().__init__(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: shard not found")
        self.index = _parse_index(index_path(self.path), self.path)
        size = self.path.stat().st_size
        offsets, sizes = self.index[:, 0], self.index[:, 1]
        ends = offsets + sizes
        if (
            (len(self.index) and offsets[0] != 0)
            or np.any(offsets[1:] != ends[:-1])
            or np.any(sizes < 16)
            or (ends[-1] if len(ends) else 0) != size
        ):
            raise FormatError(f"{self.path}: index {index_path(self.path).name} does not match the shard")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.index)

    def _parse(self, buf: bytes | memoryview, pos: int) -> Record:
        mv = memoryview(buf)
        where = f"{self.path}: record {pos}"
        if len(mv) < 16:
            raise FormatError(f"{where}: truncated record")
        head = mv[:8]
        (n,) = _U64.unpack(head)
        if n + 16 != len(mv):
            raise FormatError(f"{where}: length field {n} does not match the index/file ({len(mv) - 16})")
        if _U32.unpack(mv[8:12])[0] != masked_crc(head):
            raise FormatError(f"{where}: length CRC mismatch")
        data = mv[12 : 12 + n]
        if _U32.unpack(mv[12 + n :])[0] != masked_crc(data):
            raise FormatError(f"{where}: data CRC mismatch")
        try:
            return decode_example(data)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None

    def read(self, pos: int) -> Record:
        pos = self._check_pos(pos)
        off, size = (int(x) for x in self.index[pos])
        return self._parse(os.pread(self._fd, size, off), pos)

    def __iter__(self) -> Iterator[Record]:
        with open(self.path, "rb", buffering=1 << 20) as f:
            for pos, size in enumerate(self.index[:, 1].tolist()):
                buf = f.read(size)
                if len(buf) != size:
                    raise FormatError(f"{self.path}: record {pos}: truncated")
                yield self._parse(buf, pos)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def make_index(path: Path) -> bytes:
    """Index bytes for an existing TFRecord file: the same lines `tfrecord2idx` writes."""
    lines = []
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        off = 0
        while off < size:
            head = f.read(8)
            if len(head) != 8:
                raise FormatError(f"{path}: truncated record at offset {off}")
            (n,) = _U64.unpack(head)
            rec = n + 16
            if off + rec > size:
                raise FormatError(f"{path}: record at offset {off} runs past the end of the file")
            lines.append(f"{off} {rec}\n")
            off += rec
            f.seek(off)
    return "".join(lines).encode()
