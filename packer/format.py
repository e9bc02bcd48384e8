"""The on-disk contract between packer and trainer.

Everything both sides must agree on lives here and only here: the format version, file
names, the manifest schema, the per-sample record, sample-key rules, the TFRecord feature
names, the WebDataset member names, the LMDB record layout and the cached label arrays.

A packed folder looks like::

    manifest.json                 # written last, atomically: no manifest = incomplete
    report.json                   # every skipped image / dropped box with its reason
    <split>/labels.npz            # cached label arrays (no pickle)
    <split>/<split>-00000.tfrecord + .tfrecord.idx   (format "tfrecord")
    <split>/<split>-00000.tar + .tar.idx             (format "wds")
    <split>/data.lmdb                                (format "lmdb")
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer.schema import (  # noqa: F401  (FormatError, check_key, check_split_name, ...: re-exported)
    KEY_MAX_LEN,
    KEY_UNSAFE,
    MANIFEST_KEYS,
    MANIFEST_MAX_BYTES,
    SPLIT_NAME_RULE,
    FormatError,
    check_key,
    check_manifest,
    check_relpath,
    check_split_name,
    label_problem,
    load_json,
    record_problem,
)

FORMAT_VERSION = 1
FORMATS = ("tfrecord", "wds", "lmdb")
MANIFEST_NAME = "manifest.json"
TEMP_MARK = "packer-"  # in every hidden temp name packer writes (.<name>.packer-XXXX.tmp): only those are ever removed as ours
REPORT_NAME = "report.json"
LABELS_NAME = "labels.npz"
LMDB_NAME = "data.lmdb"
SHARD_EXT = {"tfrecord": ".tfrecord", "wds": ".tar", "lmdb": ".lmdb"}
INDEX_SUFFIX = ".idx"  # appended to the shard file name: train-00000.tfrecord.idx

# --- TFRecord features (every key present in every record; empty lists for no boxes) ---
TF_IMAGE = "image/encoded"
TF_KEY = "image/key"
TF_SOURCE = "image/source"
TF_HEIGHT = "image/height"
TF_WIDTH = "image/width"
TF_ORIG_HEIGHT = "image/orig_height"
TF_ORIG_WIDTH = "image/orig_width"
TF_CLASS = "objects/class"  # int64 list, N
TF_BBOX = "objects/bbox"  # float list, 4N: cx cy w h normalized to the stored image

# --- WebDataset members: <key>.<ext>; DALI reads ext=["jpg","cls","box"] ---
WDS_IMAGE = "jpg"
WDS_CLASS = "cls"  # int32 little-endian, N
WDS_BOX = "box"  # float32 little-endian, 4N
WDS_META = "json"  # {"key", "source", "height", "width", "orig_height", "orig_width"}
WDS_MEMBER_ORDER = (WDS_IMAGE, WDS_CLASS, WDS_BOX, WDS_META)
META_FIELDS = ("key", "source", "height", "width", "orig_height", "orig_width")  # the .json's keys, in order

# --- LMDB: key = zero-padded sample index (ascii); value = one binary record ---
LMDB_KEY_DIGITS = 10
LMDB_COUNT_KEY = b"__count__"  # ascii decimal number of samples
# Record layout, all little-endian:
#   header  "<4sHHIIIIIHHI": magic b"PKR1", version, reserved, height, width,
#           orig_height, orig_width, num_boxes N, key_len, source_len, jpeg_len
#   then    key (utf-8) | source (utf-8) | cls int32[N] | boxes float32[N*4] | jpeg bytes
LMDB_MAGIC = b"PKR1"
LMDB_HEADER = struct.Struct("<4sHHIIIIIHHI")

_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass
class Record:
    """One packed sample: JPEG bytes plus labels normalized to the stored image."""

    key: str
    source: str  # original image path, relative to the dataset root
    jpeg: bytes
    height: int  # stored (resized) image size
    width: int
    orig_height: int  # size of the original image after EXIF orientation
    orig_width: int
    cls: np.ndarray  # int32 (N,)
    boxes: np.ndarray  # float32 (N, 4): cx, cy, w, h normalized to the image

    def __post_init__(self) -> None:
        self.cls = np.ascontiguousarray(self.cls, dtype=np.int32).reshape(-1)
        self.boxes = np.ascontiguousarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if len(self.cls) != len(self.boxes):
            raise FormatError(f"{self.key}: {len(self.cls)} classes but {len(self.boxes)} boxes")
        check_key(self.key)
        if bad := record_problem(self.source, self.jpeg, (self.height, self.width, self.orig_height, self.orig_width)):
            raise FormatError(f"{self.key}: {bad}")

    def meta(self) -> dict[str, Any]:
        """The JSON-able per-sample metadata (WebDataset's `<key>.json`), keys in `META_FIELDS` order."""
        return {k: getattr(self, k) for k in META_FIELDS}


def make_key(source: str) -> str:
    """Shard-safe, deterministic, unique sample key for an image's relative path.

    Readable stem plus a hash of the full path: no dots or slashes (WebDataset and DALI
    split member names at the first dot), same key whichever machine or part packs it.
    """
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    stem = KEY_UNSAFE.sub("_", os.path.splitext(source)[0]).strip("_")
    stem = stem[-(KEY_MAX_LEN - 11) :].lstrip("_")
    return f"{stem}-{digest}" if stem else digest


def shard_name(split: str, index: int, fmt: str) -> str:
    """File name of shard `index` of `split` (relative to the split folder)."""
    if fmt == "lmdb":
        return LMDB_NAME
    return f"{split}-{index:05d}{SHARD_EXT[fmt]}"


def lmdb_key(index: int) -> bytes:
    return f"{index:0{LMDB_KEY_DIGITS}d}".encode()


def encode_lmdb_record(rec: Record) -> bytes:
    """Serialize a Record in the fixed LMDB layout (no pickle)."""
    key, source = rec.key.encode(), rec.source.encode()
    header = LMDB_HEADER.pack(
        LMDB_MAGIC, FORMAT_VERSION, 0, rec.height, rec.width, rec.orig_height, rec.orig_width,
        len(rec.cls), len(key), len(source), len(rec.jpeg),
    )
    return b"".join(
        (header, key, source, rec.cls.astype("<i4").tobytes(), rec.boxes.astype("<f4").tobytes(), rec.jpeg)
    )


def decode_lmdb_record(buf: bytes | memoryview) -> Record:
    """Parse a record written by `encode_lmdb_record`; FormatError on any inconsistency."""
    buf = memoryview(buf)
    if len(buf) < LMDB_HEADER.size:
        raise FormatError("LMDB record shorter than its header")
    magic, version, _, h, w, oh, ow, n, klen, slen, jlen = LMDB_HEADER.unpack_from(buf)
    if magic != LMDB_MAGIC or version != FORMAT_VERSION:
        raise FormatError(f"bad LMDB record magic/version {bytes(magic)!r}/{version}")
    o = LMDB_HEADER.size
    end = o + klen + slen + 4 * n + 16 * n + jlen
    if end != len(buf):
        raise FormatError(f"LMDB record length {len(buf)} != {end} from its header")
    key = bytes(buf[o : o + klen]).decode()
    o += klen
    source = bytes(buf[o : o + slen]).decode()
    o += slen
    cls = np.frombuffer(buf[o : o + 4 * n], dtype="<i4").astype(np.int32)
    o += 4 * n
    boxes = np.frombuffer(buf[o : o + 16 * n], dtype="<f4").astype(np.float32).reshape(n, 4)
    o += 16 * n
    return Record(key, source, bytes(buf[o:]), h, w, oh, ow, cls, boxes)


# ----------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    """One shard file; `path` and `index` are relative to the manifest's folder."""

    path: str
    num_samples: int
    bytes: int
    sha256: str
    index: str | None  # index file (tfrecord/wds); None for lmdb


@dataclass
class SplitInfo:
    num_samples: int
    num_boxes: int
    class_counts: list[int]  # boxes per class id
    labels: str  # path of the split's labels.npz, relative to the manifest
    shards: list[ShardInfo] = field(default_factory=list)

    @classmethod
    def of(cls, split: str, labels: LabelArrays, num_classes: int, shards: list[ShardInfo]) -> SplitInfo:
        """The manifest entry of `split`: its `<split>/labels.npz` holds `labels`, its shards `shards`."""
        return cls(num_samples=len(labels), num_boxes=len(labels.cls), labels=f"{split}/{LABELS_NAME}",
                   class_counts=labels.class_counts(num_classes).tolist(), shards=shards)


@dataclass
class Manifest:
    format: str
    size: int
    names: list[str]
    source: dict[str, Any]  # {"path": ..., "layout": "coco"|"yolo-yaml"|"yolo-dirs"|"yolo-flat"}
    options: dict[str, Any]
    packer_version: str
    splits: dict[str, SplitInfo]
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in MANIFEST_KEYS}  # stable key order: the contract fields first

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Build from a manifest's JSON object, checked first against the schema (`schema.check_manifest`:
        exact keys, JSON types, ranges, safe split names and paths); FormatError names the first misfit."""
        d = check_manifest(d, FORMAT_VERSION, FORMATS)
        splits = {k: SplitInfo(**{**s, "class_counts": list(s["class_counts"]),
                                  "shards": [ShardInfo(**sh) for sh in s["shards"]]}) for k, s in d["splits"].items()}
        m = cls(format=d["format"], size=d["size"], names=list(d["names"]), source=dict(d["source"]),
                options=dict(d["options"]), packer_version=d["packer_version"], splits=splits)
        m.validate()
        return m

    def validate(self) -> None:
        """Internal consistency: counts add up, index files as the format has them, no path leaves the folder."""
        for name, s in self.splits.items():
            check_split_name(name)
            if sum(sh.num_samples for sh in s.shards) != s.num_samples:
                raise FormatError(f"split {name!r}: shard sample counts do not add up to {s.num_samples}")
            if len(s.class_counts) != len(self.names) or sum(s.class_counts) != s.num_boxes:
                raise FormatError(f"split {name!r}: class_counts do not match names/num_boxes")
            if any((sh.index is None) != (self.format == "lmdb") for sh in s.shards):
                raise FormatError(f"split {name!r}: {self.format} shards must {'not ' * (self.format == 'lmdb')}"
                                  "have an index file")
            for p in [s.labels] + [sh.path for sh in s.shards] + [sh.index for sh in s.shards if sh.index]:
                check_relpath(p)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The validated Manifest in `data`, the bytes of a manifest.json read from `where` (a path or URL,
    for messages): the one parser of local and remote manifests. Anything wrong (too large, not UTF-8,
    not JSON, nested too deep, off the schema) is one FormatError line naming `where`."""
    obj = load_json(data, where)
    try:
        return Manifest.from_dict(obj)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Load and validate `root/manifest.json` (FormatError if absent: the build is incomplete)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path} not found: not a packed dataset, or its build did not finish")
    try:
        with open(path, "rb") as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)  # never more: a huge file is refused, not loaded
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    return parse_manifest(data, str(path))


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest atomically (last step of a build)."""
    manifest.validate()
    return atomic_write_bytes(Path(root) / MANIFEST_NAME, dumps_json(manifest.to_dict()))


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write via a temp file + fsync + rename so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMP_MARK}", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; readers on shared storage need the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------ label arrays

LABEL_FIELDS = ("keys", "sources", "offsets", "cls", "boxes", "hw", "orig_hw", "shard", "pos")


@dataclass
class LabelArrays:
    """All labels of one split, in shard order; sample i's boxes are
    `boxes[offsets[i]:offsets[i+1]]`. Saved as `<split>/labels.npz` (no pickle)."""

    keys: np.ndarray  # str (N,)
    sources: np.ndarray  # str (N,) original relative image path
    offsets: np.ndarray  # int64 (N+1,)
    cls: np.ndarray  # int32 (M,)
    boxes: np.ndarray  # float32 (M, 4) normalized cx, cy, w, h
    hw: np.ndarray  # int32 (N, 2) stored height, width
    orig_hw: np.ndarray  # int32 (N, 2) original height, width
    shard: np.ndarray  # int32 (N,) shard number (position in the manifest's shard list)
    pos: np.ndarray  # int64 (N,) record position inside that shard (lmdb: the sample index)

    def __len__(self) -> int:
        return len(self.keys)

    def class_counts(self, num_classes: int) -> np.ndarray:
        """int64 (num_classes,): boxes of each class id (ids outside 0..num_classes-1 are not counted)."""
        return np.bincount(self.cls[(self.cls >= 0) & (self.cls < num_classes)], minlength=num_classes).astype(np.int64)

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.cls[a:b], self.boxes[a:b]

    @classmethod
    def from_records(cls, rows: list[tuple[Record, int, int]]) -> LabelArrays:
        """Build from (record, shard, pos) in shard order (records may have empty jpeg)."""
        return cls._assemble(
            [np.array([r.key for r, _, _ in rows], dtype=str)], [np.array([r.source for r, _, _ in rows], dtype=str)],
            [np.array([len(r.cls) for r, _, _ in rows], dtype=np.int64)], [r.cls for r, _, _ in rows],
            [r.boxes for r, _, _ in rows], [np.array([(r.height, r.width) for r, _, _ in rows])],
            [np.array([(r.orig_height, r.orig_width) for r, _, _ in rows])],
            [np.array([s for _, s, _ in rows])], [np.array([p for _, _, p in rows])])

    @classmethod
    def concat(cls, parts: list[LabelArrays]) -> LabelArrays:
        """Concatenate label arrays (e.g. per-shard pieces) keeping sample order."""
        if not parts:
            return cls.from_records([])
        return cls._assemble(*([getattr(p, k) for p in parts] for k in ("keys", "sources")),
                             [np.diff(p.offsets) for p in parts],
                             *([getattr(p, k) for p in parts] for k in LABEL_FIELDS[3:]))

    @classmethod
    def _assemble(cls, keys, sources, counts, cls_, boxes, hw, orig_hw, shard, pos) -> LabelArrays:  # noqa: ANN001
        """Join per-piece arrays (lists, in sample order) into one LabelArrays with the contract's dtypes."""
        def cat(xs: list, dtype: Any, shape: tuple[int, ...] = (-1,)) -> np.ndarray:
            return np.concatenate([np.asarray(x).reshape(shape) for x in xs] or [np.zeros(0)]).astype(dtype).reshape(shape)

        return cls(keys=cat(keys, str), sources=cat(sources, str),
                   offsets=np.concatenate([[0], np.cumsum(cat(counts, np.int64))]).astype(np.int64),
                   cls=cat(cls_, np.int32), boxes=cat(boxes, np.float32, (-1, 4)), hw=cat(hw, np.int32, (-1, 2)),
                   orig_hw=cat(orig_hw, np.int32, (-1, 2)), shard=cat(shard, np.int32), pos=cat(pos, np.int64))

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic, deterministic .npz (np.savez writes fixed zip timestamps)."""
        buf = io.BytesIO()
        np.savez(buf, **{k: getattr(self, k) for k in LABEL_FIELDS})
        return atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike | io.BytesIO, *, num_classes: int | None = None,
             num_shards: int | None = None) -> LabelArrays:
        """Read a labels.npz without pickle and check it against the contract: dtypes, shapes, offsets,
        finite boxes, positive sizes, class ids < `num_classes` and shard numbers < `num_shards` (if given)."""
        where = path if isinstance(path, (str, os.PathLike)) else LABELS_NAME
        try:
            with np.load(path, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("a single array, not an .npz archive")
                declared = sum(i.file_size for i in z.zip.infolist())
                if declared > 64 * sum(i.compress_size for i in z.zip.infolist()) + (64 << 20):
                    raise ValueError("its members expand far beyond the archive (a zip bomb?)")
                arrays = {k: z[k] for k in LABEL_FIELDS}
        except (KeyError, ValueError, TypeError, AttributeError, OSError, EOFError, MemoryError,
                zipfile.BadZipFile) as e:
            raise FormatError(f"{where}: not a valid label array file ({str(e).splitlines()[0][:120]})") from None
        problem = label_problem(arrays, num_classes, num_shards)
        if problem:
            raise FormatError(f"{where}: label arrays do not follow the contract: {problem}")
        return cls(**arrays)

