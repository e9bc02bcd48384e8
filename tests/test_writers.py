"""Shard writers/readers against the real consumers: TensorFlow, DALI (CPU), webdataset, DALI's index tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

import packer.writers.lmdb as lmdb_writer
from packer.format import (
    LMDB_COUNT_KEY,
    TF_BBOX,
    TF_CLASS,
    TF_IMAGE,
    FormatError,
    Record,
    make_key,
    sha256_file,
)
from packer.writers import WrittenShard, get_writer, index_path, make_index, open_reader
from packer.writers.base import FILE_MODE

BIN = Path(sys.executable).parent
EXT = {"tfrecord": ".tfrecord", "wds": ".tar", "lmdb": ".lmdb"}
PER_SHARD = 3


def _records(root: Path) -> list[Record]:
    """Six real JPEGs with labels; the third is a background image (no boxes)."""
    rng = np.random.default_rng(0)
    out = []
    for i, f in enumerate(sorted((root / "train2017").glob("*.jpg"))[:6]):
        h, w = cv2.imread(str(f)).shape[:2]
        n = 0 if i == 2 else i + 1
        src = f"train2017/{f.name}"
        boxes = rng.uniform(0.05, 0.95, (n, 4)).astype(np.float32)
        out.append(Record(make_key(src), src, f.read_bytes(), h, w, h * 2, w * 2, rng.integers(0, 80, n), boxes))
    return out


@pytest.fixture(scope="module")
def records(coco128: Path) -> list[Record]:
    return _records(coco128)


def _write(fmt: str, path: Path, recs: list[Record]) -> WrittenShard:
    with get_writer(fmt, path) as w:
        for r in recs:
            w.add(r)
    return w.close()


@pytest.fixture(scope="module")
def shards(records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[WrittenShard]]:
    """Two shards per format (lmdb: two environments) of three records each."""
    out = {}
    for fmt, ext in EXT.items():
        d = tmp_path_factory.mktemp(fmt)
        out[fmt] = [
            _write(fmt, d / f"train-{i:05d}{ext}", records[i * PER_SHARD : (i + 1) * PER_SHARD]) for i in range(2)
        ]
    return out


def assert_same(a: Record, b: Record) -> None:
    assert (a.key, a.source, a.height, a.width, a.orig_height, a.orig_width) == (
        b.key, b.source, b.height, b.width, b.orig_height, b.orig_width,
    )
    assert a.jpeg == b.jpeg
    assert a.cls.dtype == np.int32 and np.array_equal(a.cls, b.cls)
    assert a.boxes.dtype == np.float32 and a.boxes.shape == b.boxes.shape and np.array_equal(a.boxes, b.boxes)


# ------------------------------------------------------------------------- our readers


@pytest.mark.parametrize("fmt", list(EXT))
def test_round_trip(fmt: str, shards: dict[str, list[WrittenShard]], records: list[Record]) -> None:
    got = []
    for i, ws in enumerate(shards[fmt]):
        assert ws.num_samples == PER_SHARD
        assert ws.bytes == ws.path.stat().st_size and ws.sha256 == sha256_file(ws.path)
        assert (ws.index == index_path(ws.path)) if fmt != "lmdb" else ws.index is None
        assert ws.index is None or ws.index.is_file()
        with open_reader(fmt, ws.path) as r:
            assert len(r) == PER_SHARD
            recs = list(r)
            for pos in (2, 0, -1):  # random access, out of order
                assert_same(r.read(pos), records[i * PER_SHARD + pos % PER_SHARD])
            with pytest.raises(IndexError):
                r.read(PER_SHARD)
        got += recs
    assert len(got) == len(records)
    for a, b in zip(got, records, strict=True):
        assert_same(a, b)
    # usual file mode (mkstemp's 0600 would hide shards from other users)
    assert {p.stat().st_mode & 0o777 for ws in shards[fmt] for p in (ws.path, ws.index) if p} == {FILE_MODE}
    # nothing but the shards and their index files: no temp or lock files
    names = sorted(p.name for p in shards[fmt][0].path.parent.iterdir())
    expect = sorted(n for ws in shards[fmt] for n in [ws.path.name] + ([ws.index.name] if ws.index else []))
    assert names == expect


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shard format 'zip'"):
        get_writer("zip", tmp_path / "x")
    with pytest.raises(ValueError, match="no index"):
        make_index("lmdb", tmp_path / "x")


@pytest.mark.parametrize("fmt", list(EXT))
def test_missing_shard_is_a_format_error(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not found"):
        open_reader(fmt, tmp_path / f"nope{EXT[fmt]}")


@pytest.mark.parametrize("fmt", list(EXT))
def test_abort_leaves_nothing(fmt: str, tmp_path: Path, records: list[Record]) -> None:
    path = tmp_path / f"train-00000{EXT[fmt]}"
    with pytest.raises(KeyboardInterrupt), get_writer(fmt, path) as w:
        w.add(records[0])
        w.add(records[2])
        # mid-write: only hidden temp files exist, nothing that looks like a shard or index
        assert all(p.name.startswith(".") for p in tmp_path.iterdir())
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="aborted"):
        w.add(records[0])
    w2 = get_writer(fmt, path)
    w2.add(records[1])
    w2.abort()
    w2.abort()
    assert list(tmp_path.iterdir()) == []


def test_empty_shard_round_trips(tmp_path: Path) -> None:
    for fmt, ext in EXT.items():
        ws = _write(fmt, tmp_path / f"e{ext}", [])
        with open_reader(fmt, ws.path) as r:
            assert len(r) == 0 and list(r) == []


# ----------------------------------------------------------------------- tfrecord + TF


def test_tensorflow_reads_and_parses(shards: dict[str, list[WrittenShard]], records: list[Record],
                                     tmp_path: Path) -> None:
    import hashlib

    from _tf_tool import tf_read

    rows = tf_read([ws.path for ws in shards["tfrecord"]], tmp_path)
    assert len(rows) == len(records)
    for row, rec in zip(rows, records, strict=True):
        # the Example we serialize is exactly TF's deterministic serialization of itself
        assert row["canonical"]
        assert row["jpeg_sha1"] == hashlib.sha1(rec.jpeg).hexdigest()
        assert row["key"] == rec.key and row["source"] == rec.source
        assert row["sizes"] == [rec.height, rec.width, rec.orig_height, rec.orig_width]
        assert np.array_equal(row["cls"], rec.cls)
        assert np.array_equal(np.array(row["boxes"], dtype=np.float32).reshape(-1, 4), rec.boxes)


def test_reads_tensorflow_written_records(tmp_path: Path, records: list[Record]) -> None:
    """Records framed and serialized by TensorFlow itself parse; a missing feature is reported."""
    from _tf_tool import tf_write

    path = tmp_path / "tf.tfrecord"
    tf_write(path, records[:4], drop={3: TF_BBOX})
    index_path(path).write_bytes(make_index("tfrecord", path))
    with open_reader("tfrecord", path) as r:
        for pos in range(3):
            assert_same(r.read(pos), records[pos])
        with pytest.raises(FormatError, match=rf"tf.tfrecord: record 3: feature '{TF_BBOX}' missing"):
            r.read(3)


def test_tfrecord_flipped_byte_fails_crc(shards: dict[str, list[WrittenShard]], tmp_path: Path) -> None:
    ws = shards["tfrecord"][0]
    bad = tmp_path / ws.path.name
    data = bytearray(ws.path.read_bytes())
    off, size = (int(x) for x in ws.index.read_text().splitlines()[1].split())
    data[off + size // 2] ^= 0x01  # inside record 1's JPEG bytes
    bad.write_bytes(bytes(data))
    index_path(bad).write_bytes(ws.index.read_bytes())
    with open_reader("tfrecord", bad) as r:
        r.read(0)
        with pytest.raises(FormatError, match=r"record 1: data CRC mismatch"):
            r.read(1)
        with pytest.raises(FormatError, match=str(bad)):
            list(r)


def test_tfrecord_index_must_match_shard(shards: dict[str, list[WrittenShard]], tmp_path: Path) -> None:
    a, b = shards["tfrecord"]
    bad = tmp_path / a.path.name
    bad.write_bytes(a.path.read_bytes())
    index_path(bad).write_bytes(b.index.read_bytes())  # another shard's index
    with pytest.raises(FormatError, match="does not match the shard"):
        open_reader("tfrecord", bad)


# ----------------------------------------------------------------------------- indices


@pytest.mark.parametrize(("fmt", "tool"), [("tfrecord", "tfrecord2idx"), ("wds", "wds2idx")])
def test_index_equals_dali_tools(fmt: str, tool: str, shards: dict[str, list[WrittenShard]], tmp_path: Path) -> None:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{exe} not installed")
    for ws in shards[fmt]:
        ref = tmp_path / f"{ws.path.name}.ref"
        subprocess.run([str(exe), str(ws.path), str(ref)], check=True, capture_output=True)
        assert ws.index.read_bytes() == ref.read_bytes()
        assert make_index(fmt, ws.path) == ref.read_bytes()


# -------------------------------------------------------------------------------- DALI


def _dali_run(pipe, n: int) -> list[tuple[np.ndarray, ...]]:  # noqa: ANN001
    pipe.build()
    assert pipe.epoch_size("Reader") == n
    out: list[tuple[np.ndarray, ...]] = []
    while len(out) < n:
        batch = pipe.run()
        out += [tuple(np.array(t[i]) for t in batch) for i in range(len(batch[0]))]
    return out[:n]


def _check_dali(got: list[tuple[np.ndarray, ...]], records: list[Record]) -> None:
    for (img, cls, boxes), rec in zip(got, records, strict=True):
        assert img.shape == (rec.height, rec.width, 3)
        assert np.array_equal(cls.astype(np.int32), rec.cls)
        assert boxes.shape == (len(rec.cls), 4) and np.array_equal(boxes, rec.boxes)


def test_dali_reads_tfrecord(shards: dict[str, list[WrittenShard]], records: list[Record]) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    from packer.writers.tfrecord import dali_features

    paths = [str(ws.path) for ws in shards["tfrecord"]]

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def pipe():  # noqa: ANN202
        # the declaration the trainer's DALI loader uses (packer.writers.tfrecord.dali_features)
        f = fn.readers.tfrecord(path=paths, index_path=[p + ".idx" for p in paths], name="Reader",
                                features=dali_features())
        return fn.decoders.image(f[TF_IMAGE], device="cpu"), f[TF_CLASS], f[TF_BBOX]

    _check_dali(_dali_run(pipe(), len(records)), records)


def test_dali_reads_webdataset(shards: dict[str, list[WrittenShard]], records: list[Record]) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    from packer.writers.wds import dali_members

    paths = [str(ws.path) for ws in shards["wds"]]
    ext, dtypes = dali_members()  # the declaration the trainer's DALI loader uses

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def pipe():  # noqa: ANN202
        jpg, cls, box, _meta = fn.readers.webdataset(
            paths=paths, index_paths=[p + ".idx" for p in paths], name="Reader",
            ext=ext, dtypes=dtypes, missing_component_behavior="error",
        )
        return fn.decoders.image(jpg, device="cpu"), cls, fn.reshape(box, shape=[-1, 4])

    _check_dali(_dali_run(pipe(), len(records)), records)


# -------------------------------------------------------------------------- webdataset


def test_webdataset_library_iterates(shards: dict[str, list[WrittenShard]], records: list[Record]) -> None:
    wds = pytest.importorskip("webdataset")
    import json

    samples = list(wds.WebDataset([str(ws.path) for ws in shards["wds"]], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r.key for r in records]
    for s, rec in zip(samples, records, strict=True):
        assert s["jpg"] == rec.jpeg
        assert s["cls"] == rec.cls.astype("<i4").tobytes() and s["box"] == rec.boxes.astype("<f4").tobytes()
        assert json.loads(s["json"]) == rec.meta()


def test_wds_tar_is_deterministic_posix(shards: dict[str, list[WrittenShard]], records: list[Record], tmp_path: Path):
    import tarfile

    ws = shards["wds"][0]
    with tarfile.open(ws.path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [f"{records[0].key}.{e}" for e in ("jpg", "cls", "box", "json")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }
    again = _write("wds", tmp_path / ws.path.name, records[:PER_SHARD])
    assert again.path.read_bytes() == ws.path.read_bytes() and again.sha256 == ws.sha256


def test_wds_missing_member_is_reported(shards: dict[str, list[WrittenShard]], tmp_path: Path) -> None:
    ws = shards["wds"][0]
    bad = tmp_path / ws.path.name
    data = bytearray(ws.path.read_bytes())
    line = ws.index.read_text().splitlines()[2].split()  # sample 1
    cls_header = int(line[5]) - 512
    data[cls_header : cls_header + 512] = bytes(512)  # wipe the .cls member's header
    bad.write_bytes(bytes(data))
    index_path(bad).write_bytes(ws.index.read_bytes())
    with open_reader("wds", bad) as r:
        r.read(0)
        with pytest.raises(FormatError, match=r"sample 1 .*\.cls"):
            r.read(1)


# -------------------------------------------------------------------------------- lmdb


def test_lmdb_is_byte_deterministic_and_compact(records: list[Record], tmp_path: Path) -> None:
    a = _write("lmdb", tmp_path / "a" / "data.lmdb", records)
    b = _write("lmdb", tmp_path / "b" / "data.lmdb", records)
    assert a.path.read_bytes() == b.path.read_bytes() and a.sha256 == b.sha256
    payload = sum(len(r.jpeg) for r in records)
    assert payload < a.bytes < payload * 1.1 + 64 * 1024  # compacted: about the size of its data
    assert sorted(p.name for p in a.path.parent.iterdir()) == ["data.lmdb"]  # no lock file


def test_lmdb_bytes_do_not_depend_on_transactions(
    records: list[Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small values (inline, odd sizes; one-page overflow) expose LMDB's stale page bytes."""
    rng = np.random.default_rng(1)
    small = [
        Record(f"s{i}", f"s/{i}.jpg", rng.bytes(int(rng.integers(1, 4000))), 8, 8, 8, 8, [i % 3], [[0.5] * 4])
        for i in range(300)
    ]
    recs = records[:2] + small + records[2:]
    a = _write("lmdb", tmp_path / "a.lmdb", recs)
    monkeypatch.setattr(lmdb_writer, "_INITIAL_MAP", 64 * 1024)  # many commits and map resizes
    monkeypatch.setattr(lmdb_writer, "_COMMIT_BYTES", 64 * 1024)
    b = _write("lmdb", tmp_path / "b.lmdb", recs)
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()
    with open_reader("lmdb", b.path) as r:
        for x, y in zip(r, recs, strict=True):
            assert_same(x, y)


def test_lmdb_grows_its_map(records: list[Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmdb_writer, "_INITIAL_MAP", 64 * 1024)
    monkeypatch.setattr(lmdb_writer, "_COMMIT_BYTES", 256 * 1024)
    ws = _write("lmdb", tmp_path / "grow.lmdb", records * 3)
    # and when the size estimate is wrong, MapFullError is caught and the transaction replayed
    monkeypatch.setattr(lmdb_writer.Writer, "_used", lambda self: 0)
    ws2 = _write("lmdb", tmp_path / "full.lmdb", records * 3)
    for w in (ws, ws2):
        with open_reader("lmdb", w.path) as r:
            assert len(r) == 18
            for a, b in zip(r, records * 3, strict=True):
                assert_same(a, b)


def test_lmdb_corrupt_record_is_a_format_error(shards: dict[str, list[WrittenShard]], tmp_path: Path) -> None:
    bad = tmp_path / "bad.lmdb"
    bad.write_bytes(shards["lmdb"][0].path.read_bytes())
    env = lmdb.open(str(bad), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        v = txn.get(b"0000000001")
        txn.put(b"0000000001", v[:-7])  # truncated record
        txn.put(b"0000000002", b"XXXX" + v[4:])  # bad magic
    env.close()
    with open_reader("lmdb", bad) as r:
        r.read(0)
        with pytest.raises(FormatError, match=r"bad.lmdb: record 1: LMDB record length"):
            r.read(1)
        with pytest.raises(FormatError, match=r"record 2: bad LMDB record magic"):
            r.read(2)
        with pytest.raises(FormatError, match="record 1"):
            list(r)
    env = lmdb.open(str(bad), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.delete(LMDB_COUNT_KEY)
    env.close()
    with pytest.raises(FormatError, match="__count__"):
        open_reader("lmdb", bad)
    assert sorted(os.listdir(tmp_path)) == ["bad.lmdb"]
