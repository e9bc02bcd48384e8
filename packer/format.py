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
import json
import os
import re
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
FORMATS = ("tfrecord", "wds", "lmdb")
MANIFEST_NAME = "manifest.json"
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

KEY_MAX_LEN = 80  # keeps tar member names inside ustar's 100-byte name field
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Split names become folder and file names under the output folder, so they are held to
# the same safe alphabet as keys: no dots, slashes or empty names can leave `-o`.
SPLIT_NAME_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FormatError(ValueError):
    """A packed folder or record does not follow this contract."""


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

    def meta(self) -> dict[str, Any]:
        """The JSON-able per-sample metadata (WebDataset's `<key>.json`)."""
        return {
            "key": self.key,
            "source": self.source,
            "height": self.height,
            "width": self.width,
            "orig_height": self.orig_height,
            "orig_width": self.orig_width,
        }


def make_key(source: str) -> str:
    """Shard-safe, deterministic, unique sample key for an image's relative path.

    Readable stem plus a hash of the full path: no dots or slashes (WebDataset and DALI
    split member names at the first dot), same key whichever machine or part packs it.
    """
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    stem = _KEY_UNSAFE.sub("_", os.path.splitext(source)[0]).strip("_")
    stem = stem[-(KEY_MAX_LEN - 11) :].lstrip("_")
    return f"{stem}-{digest}" if stem else digest


def check_key(key: str) -> None:
    """Raise FormatError unless `key` is safe for every reader."""
    if not key or len(key) > KEY_MAX_LEN or _KEY_UNSAFE.search(key):
        raise FormatError(f"unsafe sample key {key!r}: use [A-Za-z0-9_-], at most {KEY_MAX_LEN} chars")


def check_split_name(name: object) -> str:
    """Return `name` if it is a safe split name ([A-Za-z0-9_-], 1..64 chars), else raise FormatError."""
    if not isinstance(name, str) or not SPLIT_NAME_RULE.fullmatch(name):
        raise FormatError(f"invalid split name {name!r}: use 1-64 characters from [A-Za-z0-9_-]")
    return name


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
        # stable key order: the contract fields first
        order = ("format_version", "format", "size", "names", "source", "options", "packer_version", "splits")
        return {k: d[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            if d["format_version"] != FORMAT_VERSION:
                raise FormatError(
                    f"manifest format_version {d['format_version']} is not supported (this build reads {FORMAT_VERSION})"
                )
            if d["format"] not in FORMATS:
                raise FormatError(f"unknown format {d['format']!r}")
            splits = {
                name: SplitInfo(
                    num_samples=int(s["num_samples"]),
                    num_boxes=int(s["num_boxes"]),
                    class_counts=[int(c) for c in s["class_counts"]],
                    labels=s["labels"],
                    shards=[ShardInfo(**sh) for sh in s["shards"]],
                )
                for name, s in d["splits"].items()
            }
            m = cls(
                format=d["format"], size=int(d["size"]), names=list(d["names"]), source=dict(d["source"]),
                options=dict(d["options"]), packer_version=d["packer_version"], splits=splits,
            )
        except (KeyError, TypeError) as e:
            raise FormatError(f"manifest is missing or has a malformed field: {e}") from e
        m.validate()
        return m

    def validate(self) -> None:
        """Internal consistency: counts add up and no path leaves the dataset folder."""
        for name, s in self.splits.items():
            if sum(sh.num_samples for sh in s.shards) != s.num_samples:
                raise FormatError(f"split {name!r}: shard sample counts do not add up to {s.num_samples}")
            if len(s.class_counts) != len(self.names) or sum(s.class_counts) != s.num_boxes:
                raise FormatError(f"split {name!r}: class_counts do not match names/num_boxes")
            for p in [s.labels] + [sh.path for sh in s.shards] + [sh.index for sh in s.shards if sh.index]:
                check_relpath(p)


def check_relpath(p: str) -> None:
    """Paths inside a manifest must stay inside the dataset folder."""
    if p.startswith("/") or "\\" in p or ".." in Path(p).parts or "://" in p:
        raise FormatError(f"unsafe path in manifest: {p!r}")


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Load and validate `root/manifest.json` (FormatError if absent: the build is incomplete)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path} not found: not a packed dataset, or its build did not finish")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from e
    return Manifest.from_dict(data)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.cls[a:b], self.boxes[a:b]

    @classmethod
    def from_records(cls, rows: list[tuple[Record, int, int]]) -> LabelArrays:
        """Build from (record, shard, pos) in shard order (records may have empty jpeg)."""
        counts = np.array([len(r.cls) for r, _, _ in rows], dtype=np.int64)
        return cls(
            keys=np.array([r.key for r, _, _ in rows], dtype=str),
            sources=np.array([r.source for r, _, _ in rows], dtype=str),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            cls=np.concatenate([r.cls for r, _, _ in rows] or [np.zeros(0)]).astype(np.int32),
            boxes=np.concatenate([r.boxes for r, _, _ in rows] or [np.zeros((0, 4))]).astype(np.float32).reshape(-1, 4),
            hw=np.array([(r.height, r.width) for r, _, _ in rows], dtype=np.int32).reshape(-1, 2),
            orig_hw=np.array([(r.orig_height, r.orig_width) for r, _, _ in rows], dtype=np.int32).reshape(-1, 2),
            shard=np.array([s for _, s, _ in rows], dtype=np.int32),
            pos=np.array([p for _, _, p in rows], dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: list[LabelArrays]) -> LabelArrays:
        """Concatenate label arrays (e.g. per-shard pieces) keeping sample order."""
        if not parts:
            return cls.from_records([])
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        return cls(
            keys=np.concatenate([p.keys for p in parts]).astype(str),
            sources=np.concatenate([p.sources for p in parts]).astype(str),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            cls=np.concatenate([p.cls for p in parts]).astype(np.int32),
            boxes=np.concatenate([p.boxes for p in parts]).astype(np.float32).reshape(-1, 4),
            hw=np.concatenate([p.hw for p in parts]).astype(np.int32).reshape(-1, 2),
            orig_hw=np.concatenate([p.orig_hw for p in parts]).astype(np.int32).reshape(-1, 2),
            shard=np.concatenate([p.shard for p in parts]).astype(np.int32),
            pos=np.concatenate([p.pos for p in parts]).astype(np.int64),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic, deterministic .npz (np.savez writes fixed zip timestamps)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: getattr(self, k) for k in LABEL_FIELDS})
        return atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelArrays:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in LABEL_FIELDS}
        except (KeyError, ValueError, OSError) as e:
            raise FormatError(f"{path}: not a valid label array file ({e})") from e
        la = cls(**arrays)
        n = len(la.keys)
        if la.offsets.shape != (n + 1,) or la.offsets[-1] != len(la.cls) or la.boxes.shape != (len(la.cls), 4):
            raise FormatError(f"{path}: inconsistent label array shapes")
        return la
