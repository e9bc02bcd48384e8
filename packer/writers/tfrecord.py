"""TFRecord shards of `tf.train.Example`, written and read with `protobuf`, without TensorFlow.

Framing per record (little-endian): ``u64 len | u32 masked_crc32c(len) | data | u32
masked_crc32c(data)``. The Example message classes are built at import from the schema of
TensorFlow's ``example.proto`` / ``feature.proto`` (written out below as a descriptor, so
neither TensorFlow nor protoc is needed), in a private descriptor pool that cannot clash
with TensorFlow's own. Records are serialized deterministically (feature map in key order),
which is what TensorFlow's deterministic serialization of the same Example gives. The index
``<shard>.idx`` has one ``"<offset> <size>\\n"`` line per record, as DALI's `tfrecord2idx`.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

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
from packer.writers.base import IndexedFileReader, IndexedFileWriter, index_bytes, indexed_shard_size

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
FRAME_BYTES = 16  # length, its CRC, and the data CRC around each record's data

_BYTES, _FLOAT, _INT64 = "bytes_list", "float_list", "int64_list"  # the `Feature.kind` oneof
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
_SIZES = (TF_HEIGHT, TF_WIDTH, TF_ORIG_HEIGHT, TF_ORIG_WIDTH)
_INDEX_LINES = re.compile(rb"(?:[0-9]{1,18} [0-9]{1,18}\n)*")  # tfrecord2idx: "<offset> <size>\n"


def _example_schema() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow/core/example/{feature,example}.proto (proto3), the messages an Example needs."""
    fd = descriptor_pb2.FieldDescriptorProto
    rep, msg = fd.LABEL_REPEATED, fd.TYPE_MESSAGE
    f = descriptor_pb2.FileDescriptorProto(name="packer/tf_example.proto", package="tensorflow", syntax="proto3")
    for name, scalar in (("BytesList", fd.TYPE_BYTES), ("FloatList", fd.TYPE_FLOAT), ("Int64List", fd.TYPE_INT64)):
        field = f.message_type.add(name=name).field.add(name="value", number=1, type=scalar, label=rep)
        if scalar != fd.TYPE_BYTES:
            field.options.packed = True
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, cls) in enumerate(
        ((_BYTES, "BytesList"), (_FLOAT, "FloatList"), (_INT64, "Int64List")), start=1
    ):
        feature.field.add(name=name, number=number, type=msg, type_name=f".tensorflow.{cls}", oneof_index=0)
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=fd.TYPE_STRING)
    entry.field.add(name="value", number=2, type=msg, type_name=".tensorflow.Feature")
    features.field.add(name="feature", number=1, type=msg, label=rep, type_name=".tensorflow.Features.FeatureEntry")
    example = f.message_type.add(name="Example")
    example.field.add(name="features", number=1, type=msg, type_name=".tensorflow.Features")
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_example_schema())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC-32C."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _example_bytes(rec: Record) -> bytes:
    """`rec` as a serialized `tf.train.Example` (TensorFlow's deterministic serialization)."""
    ex = Example()
    feats = ex.features.feature
    for name, value in ((TF_IMAGE, rec.jpeg), (TF_KEY, rec.key.encode()), (TF_SOURCE, rec.source.encode())):
        feats[name].bytes_list.value.append(value)
    for name, value in zip(_SIZES, (rec.height, rec.width, rec.orig_height, rec.orig_width), strict=True):
        feats[name].int64_list.value.append(int(value))
    cls, boxes = feats[TF_CLASS].int64_list, feats[TF_BBOX].float_list
    cls.SetInParent()  # present (as an empty list) for background images too
    boxes.SetInParent()
    cls.value.extend(rec.cls.tolist())
    boxes.value.extend(rec.boxes.reshape(-1).tolist())  # float32 -> float -> float32 is exact
    return ex.SerializeToString(deterministic=True)


def decode_example(data: bytes | memoryview) -> Record:
    """Parse a serialized `tf.train.Example` holding this contract's features into a Record."""
    try:
        feats = Example.FromString(data).features.feature
    except DecodeError as e:
        raise FormatError(f"not a tf.train.Example ({e})") from None
    for name, kind in _FEATURES.items():
        if name not in feats:
            raise FormatError(f"feature {name!r} missing")
        if feats[name].WhichOneof("kind") != kind:
            raise FormatError(f"feature {name!r} has the wrong type")

    def one(name: str) -> bytes | int:
        values = getattr(feats[name], _FEATURES[name]).value
        if len(values) != 1:
            raise FormatError(f"feature {name!r} has {len(values)} values, expected 1")
        return values[0]

    cls = np.array(feats[TF_CLASS].int64_list.value, dtype=np.int64)
    boxes = np.array(feats[TF_BBOX].float_list.value, dtype=np.float32)
    if len(boxes) != 4 * len(cls):
        raise FormatError(f"{len(cls)} classes but {len(boxes)} box values (expected {4 * len(cls)})")
    if len(cls) and (cls.min() < np.iinfo(np.int32).min or cls.max() > np.iinfo(np.int32).max):
        raise FormatError("class id outside int32")
    try:
        key, source = one(TF_KEY).decode(), one(TF_SOURCE).decode()  # type: ignore[union-attr]
    except UnicodeDecodeError as e:
        raise FormatError(f"key/source is not UTF-8: {e}") from None
    h, w, oh, ow = (one(name) for name in _SIZES)
    return Record(key, source, one(TF_IMAGE), h, w, oh, ow, cls, boxes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ writer/reader


class Writer(IndexedFileWriter):
    """Streams framed Examples into `<shard>` and `"<offset> <size>"` lines into `<shard>.idx`."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self._idx = self._index_temp()
        except BaseException:
            self._data.discard()
            raise

    def add(self, rec: Record) -> None:
        self._check_open()
        data = _example_bytes(rec)
        n = _U64.pack(len(data))
        offset = self._data.size
        self._data.write(n + _U32.pack(masked_crc(n)))
        self._data.write(data)
        self._data.write(_U32.pack(masked_crc(data)))
        self._idx.write(f"{offset} {len(data) + FRAME_BYTES}\n".encode())
        self.num_samples += 1

    def _finalize(self) -> None:
        self._data.finish()
        self._idx.finish()


class Reader(IndexedFileReader):
    """Reads a TFRecord shard with its `.idx`; checks both CRCs of every record."""

    def _load_index(self, index: Path, shard_size: int) -> None:
        self.index = read_index(index, shard_size)

    def __len__(self) -> int:
        return len(self.index)

    def _parse(self, buf: bytes | memoryview, pos: int) -> Record:
        mv = memoryview(buf)
        where = f"{self.path}: record {pos}"
        if len(mv) < FRAME_BYTES:
            raise FormatError(f"{where}: truncated record")
        head = mv[:8]
        (n,) = _U64.unpack(head)
        if n + FRAME_BYTES != len(mv):
            raise FormatError(f"{where}: length field {n} does not match the index/file ({len(mv) - FRAME_BYTES})")
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


# ------------------------------------------------------------------------------ index


def _index_lines(data: bytes, where: str) -> list[bytes]:
    """The lines (newline kept) of a well-formed index, else FormatError."""
    if not _INDEX_LINES.fullmatch(data):
        raise FormatError(f"{where}: malformed index (want '<offset> <size>' lines)")
    return data.splitlines(keepends=True)


def read_index(src: Path | str | bytes, shard_size: int | None = None) -> np.ndarray:
    """int64 (n, 2): offset and size (framing included) of each record, from a shard's index file.

    `src` is the index file or its bytes. The records must tile the shard: the first at 0, each
    where the previous one ends, each at least a frame, the last ending at `shard_size` (by
    default the size of the shard the index file names: its path without the ``.idx``).
    FormatError if not.
    """
    data, where = index_bytes(src)
    shard_size = indexed_shard_size(src, shard_size)
    _index_lines(data, where)
    index = np.array(data.split(), dtype=np.int64).reshape(-1, 2)
    offsets, sizes = index[:, 0], index[:, 1]
    ends = offsets + sizes
    if (
        (len(index) and offsets[0] != 0)
        or np.any(offsets[1:] != ends[:-1])
        or np.any(sizes < FRAME_BYTES)
        or (int(ends[-1]) if len(ends) else 0) != shard_size
    ):
        raise FormatError(f"{where}: index does not match the shard ({shard_size} bytes)")
    return index


def trim_index(src: Path | str | bytes, start: int, stop: int) -> bytes:
    """The index of records ``[start, stop)`` only, offsets unchanged: DALI's reader given it reads
    just those records of the whole shard file."""
    lines = _index_lines(*index_bytes(src))
    if not 0 <= start <= stop <= len(lines):
        raise ValueError(f"records [{start}, {stop}) are not within the index's {len(lines)}")
    return b"".join(lines[start:stop])


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
            rec = n + FRAME_BYTES
            if off + rec > size:
                raise FormatError(f"{path}: record at offset {off} runs past the end of the file")
            lines.append(f"{off} {rec}\n")
            off += rec
            f.seek(off)
    return "".join(lines).encode()


def dali_features() -> dict:
    """The `features` DALI's `fn.readers.tfrecord` needs to read our records (image, key, classes,
    boxes as N x 4). Imports DALI, so only the trainer side calls it."""
    import nvidia.dali.tfrecord as tfrec

    return {
        TF_IMAGE: tfrec.FixedLenFeature((), tfrec.string, ""),
        TF_KEY: tfrec.FixedLenFeature((), tfrec.string, ""),
        TF_CLASS: tfrec.VarLenFeature(tfrec.int64, 0),
        TF_BBOX: tfrec.VarLenFeature([4], tfrec.float32, 0.0),
    }
