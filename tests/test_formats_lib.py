"""The format library's index helpers, Example codec, LMDB reader and LMDB page normalization.

What the trainer reuses: `read_index` / `trim_index` per indexed format (checked against DALI's
own readers given a trimmed index) and the LMDB Reader across fork.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from packer.format import TF_CLASS, TF_HEIGHT, TF_IMAGE, WDS_IMAGE, WDS_MEMBER_ORDER, FormatError, Record
from packer.writers import (
    UnknownFormatError,
    get_writer,
    index_path,
    open_reader,
    read_index,
    tfrecord,
    trim_index,
    wds,
)
from packer.writers import lmdb_pages as lmdb_fmt

EXT = {"tfrecord": ".tfrecord", "wds": ".tar", "lmdb": ".lmdb"}


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Five small real JPEGs; the second is a background image (no boxes)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        img = rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)
        jpeg = cv2.imencode(".jpg", img)[1].tobytes()
        n = 0 if i == 1 else i + 1
        boxes = rng.uniform(0.1, 0.9, (n, 4)).astype(np.float32)
        out.append(Record(f"k{i}", f"img/{i}.jpg", jpeg, img.shape[0], 64, img.shape[0] * 2, 128,
                          rng.integers(0, 80, n), boxes))
    return out


@pytest.fixture(scope="module")
def shards(records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shards")
    out = {}
    for fmt, ext in EXT.items():
        with get_writer(fmt, d / f"train-00000{ext}") as w:
            for r in records:
                w.add(r)
        out[fmt] = w.close().path
    return out


def _copy(src: Path, dst_dir: Path, index: bytes | None = None) -> Path:
    """The shard copied into `dst_dir` with its index (or `index` instead)."""
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    index_path(dst).write_bytes(index_path(src).read_bytes() if index is None else index)
    return dst


# ------------------------------------------------------------------------------ read_index


def test_tfrecord_read_index_is_the_record_frames(shards: dict[str, Path], records: list[Record]) -> None:
    path = shards["tfrecord"]
    idx = read_index("tfrecord", index_path(path))
    assert idx.dtype == np.int64 and idx.shape == (len(records), 2)
    assert np.array_equal(idx, tfrecord.read_index(index_path(path).read_bytes(), path.stat().st_size))
    data = path.read_bytes()
    for (off, size), rec in zip(idx.tolist(), records, strict=True):
        (n,) = struct.unpack_from("<Q", data, off)
        assert size == n + 16
        assert tfrecord.decode_example(data[off + 12 : off + 12 + n]).jpeg == rec.jpeg


def test_wds_read_index_samples_and_members(shards: dict[str, Path], records: list[Record]) -> None:
    path = shards["wds"]
    data = path.read_bytes()
    idx = read_index("wds", index_path(path))
    assert idx.shape == (len(records), 2) and idx[0, 0] == 0
    assert np.array_equal(idx[1:, 0], idx[:-1].sum(1))  # samples tile the tar
    assert idx[-1].sum() + 1024 <= len(data)  # end-of-archive blocks follow
    jpg = wds.read_index(index_path(path), member=WDS_IMAGE)
    for (off, size), rec in zip(jpg.tolist(), records, strict=True):
        assert data[off : off + size] == rec.jpeg
    # one sample's bytes are a tar of exactly its members
    import io
    import tarfile

    off, size = idx[2].tolist()
    with tarfile.open(fileobj=io.BytesIO(data[off : off + size])) as t:
        assert t.getnames() == [f"{records[2].key}.{e}" for e in WDS_MEMBER_ORDER]
    with pytest.raises(ValueError, match="unknown member"):
        wds.read_index(index_path(path), member="png")


@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_read_index_needs_the_shard_size(fmt: str, shards: dict[str, Path], tmp_path: Path) -> None:
    path = shards[fmt]
    raw = index_path(path).read_bytes()
    with pytest.raises(ValueError, match="shard_size"):
        read_index(fmt, raw)
    end = int(read_index(fmt, raw, path.stat().st_size)[-1].sum())
    with pytest.raises(FormatError, match="not match"):
        read_index(fmt, raw, end - 1)  # shard cut short
    moved = tmp_path / "x.index"
    moved.write_bytes(raw)
    with pytest.raises(ValueError, match="shard_size"):
        read_index(fmt, moved)  # no <shard>.idx name: which shard is unknown
    index_path(tmp_path / path.name).write_bytes(raw)
    with pytest.raises(FormatError, match="shard not found"):
        read_index(fmt, index_path(tmp_path / path.name))
    with pytest.raises(FormatError, match="index file not found"):
        read_index(fmt, tmp_path / "none.idx", 10)
    with pytest.raises(UnknownFormatError, match="no index"):
        read_index("lmdb", raw, 10)


def _tf_garbage(good: bytes) -> list[bytes]:
    lines = good.splitlines(keepends=True)
    a, b = (int(x) for x in lines[0].split())
    return [
        good[:-1],  # last line not terminated
        good.replace(b" ", b"  ", 1),
        good.replace(b"\n", b"\r\n"),
        b"x y\n" + good,
        f"{a} {b} {b}\n".encode() + b"".join(lines[1:]),  # three numbers on a line
        f"{a} {b // 2} {a + b // 2} {b - b // 2}\n".encode() + b"".join(lines[1:]),  # four: two records
        b"".join(lines[1:]),  # first record missing
        lines[0] + lines[0] + b"".join(lines[1:]),
        "١ 2\n".encode(),  # a non-ASCII digit
        b"0 8\n8 " + str(sum(int(x) for x in good.split()[-2:]) - 8).encode() + b"\n",  # a record below a frame
    ]


def _wds_garbage(good: bytes) -> list[bytes]:
    head, *lines = good.decode().splitlines()
    one = lines[1].split(" ")
    swapped = one[4:8] + one[0:4] + one[8:]
    shifted = [t if i != 5 else str(int(t) + 512) for i, t in enumerate(one)]
    renamed = [t if i != 7 else "other.cls" for i, t in enumerate(one)]

    def with_line(toks: list[str]) -> bytes:
        return "\n".join([head, lines[0], " ".join(toks), *lines[2:]]).encode() + b"\n"

    return [
        good[:-1],
        good.replace(b"v1.2", b"v1.1", 1),
        good.replace(head.encode(), f"v1.2 {len(lines) + 1}".encode(), 1),
        "\n".join([head, *lines[1:]]).encode() + b"\n",  # a sample missing but counted
        with_line(swapped),
        with_line(shifted),
        with_line(renamed),
        with_line(one[:-4]),
        good.replace(b" ", b"  ", 1),
        b"\xff" + good,
    ]


@pytest.mark.parametrize(("fmt", "garbage"), [("tfrecord", _tf_garbage), ("wds", _wds_garbage)])
def test_read_index_rejects_garbage(fmt: str, garbage, shards: dict[str, Path], tmp_path: Path) -> None:  # noqa: ANN001
    path = shards[fmt]
    good = index_path(path).read_bytes()
    size = path.stat().st_size
    read_index(fmt, good, size)
    for i, bad in enumerate(garbage(good)):
        assert bad != good
        with pytest.raises(FormatError):
            read_index(fmt, bad, size)
            pytest.fail(f"garbage {i} accepted")
        d = tmp_path / str(i)
        d.mkdir()
        with pytest.raises(FormatError):  # the reader refuses the shard with it too
            open_reader(fmt, _copy(path, d, bad))


def test_wds_decode_sample_takes_webdatasets_samples(shards: dict[str, Path], records: list[Record]) -> None:
    webdataset = pytest.importorskip("webdataset")
    samples = list(webdataset.WebDataset([str(shards["wds"])], shardshuffle=False))
    got = [wds.decode_sample(s, s["__key__"]) for s in samples]
    assert [(g.key, g.source, g.jpeg, g.cls.tolist(), g.boxes.tolist()) for g in got] == [
        (r.key, r.source, r.jpeg, r.cls.tolist(), r.boxes.tolist()) for r in records
    ]
    with pytest.raises(FormatError, match=r"member k0\.box missing"):
        wds.decode_sample({k: v for k, v in samples[0].items() if k != "box"}, "k0")
    with pytest.raises(FormatError, match="names key 'k0'"):
        wds.decode_sample(samples[0], "k1")


# ------------------------------------------------------------------------------ trim_index


def _trimmed_index_reference(fmt: str, text: str, start: int, stop: int) -> bytes:
    """An independent restatement of what `packer.writers.trim_index` must return for records [start, stop)."""
    lines = text.splitlines()
    if fmt == "wds":
        body = lines[1:][start:stop]
        return (f"{lines[0].split()[0]} {len(body)}\n" + "".join(b + "\n" for b in body)).encode()
    return "".join(b + "\n" for b in lines[start:stop]).encode()


@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_trim_index_matches_the_trainers_rule(fmt: str, shards: dict[str, Path], records: list[Record]) -> None:
    idx = index_path(shards[fmt])
    n = len(records)
    for start, stop in [(0, n), (0, 0), (1, 3), (4, 5), (2, 2), (0, 1)]:
        want = _trimmed_index_reference(fmt, idx.read_text(), start, stop)
        assert trim_index(fmt, idx, start, stop) == want
        assert trim_index(fmt, idx.read_bytes(), start, stop) == want
    for start, stop in [(-1, 2), (3, 2), (0, n + 1)]:
        with pytest.raises(ValueError, match="not within"):
            trim_index(fmt, idx, start, stop)
    with pytest.raises(FormatError):
        trim_index(fmt, b"garbage", 0, 1)


def _dali_read(fmt: str, shard: Path, index: Path) -> list[bytes]:
    """JPEG bytes of every sample DALI's reader yields from `shard` with `index` (CPU)."""
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=None, seed=0)
    def pipe():  # noqa: ANN202
        if fmt == "tfrecord":
            import nvidia.dali.tfrecord as tfrec

            f = fn.readers.tfrecord(path=[str(shard)], index_path=[str(index)], name="Reader",
                                    features={TF_IMAGE: tfrec.FixedLenFeature((), tfrec.string, "")})
            return f[TF_IMAGE]
        return fn.readers.webdataset(paths=[str(shard)], index_paths=[str(index)], name="Reader", ext=["jpg"],
                                     dtypes=[types.UINT8], missing_component_behavior="error")

    p = pipe()
    p.build()
    n = p.epoch_size("Reader")
    out: list[bytes] = []
    while len(out) < n:
        (batch,) = p.run()
        out += [np.array(batch[i]).tobytes() for i in range(len(batch))]
    return out[:n]


@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_dali_reads_just_the_trimmed_records(fmt: str, shards: dict[str, Path], records: list[Record],
                                             tmp_path: Path) -> None:
    idx = tmp_path / "part.idx"
    idx.write_bytes(trim_index(fmt, index_path(shards[fmt]), 1, 4))
    assert _dali_read(fmt, shards[fmt], idx) == [r.jpeg for r in records[1:4]]


# ---------------------------------------------------------------------------- tf.Example


def test_example_decode_rejects_what_is_not_the_contract(records: list[Record]) -> None:
    ex = tfrecord.Example.FromString(tfrecord._example_bytes(records[0]))
    assert tfrecord.decode_example(ex.SerializeToString()).key == records[0].key
    with pytest.raises(FormatError, match="not a tf.train.Example"):
        tfrecord.decode_example(b"\x0a\xff\xff")
    two = tfrecord.Example()
    two.CopyFrom(ex)
    two.features.feature[TF_HEIGHT].int64_list.value.append(3)
    with pytest.raises(FormatError, match=f"'{TF_HEIGHT}' has 2 values"):
        tfrecord.decode_example(two.SerializeToString())
    typed = tfrecord.Example()
    typed.CopyFrom(ex)
    typed.features.feature[TF_CLASS].float_list.value.append(1.0)
    with pytest.raises(FormatError, match="wrong type"):
        tfrecord.decode_example(typed.SerializeToString())


# -------------------------------------------------------------------------------- lmdb


def _in_child(fd: int, work) -> None:  # noqa: ANN001
    """Write `work()` to `fd` and end this forked process (status 1 if work raised)."""
    code = 1
    try:
        os.write(fd, work().encode())
        code = 0
    except BaseException as e:
        os.write(fd, repr(e).encode())
    finally:
        os._exit(code)


def _jpeg_digest(reader) -> str:  # noqa: ANN001
    return hashlib.sha1(b"".join(reader[i].jpeg for i in range(len(reader)))).hexdigest()


def test_lmdb_reader_opens_per_process(shards: dict[str, Path], records: list[Record]) -> None:
    want = hashlib.sha1(b"".join(r.jpeg for r in records)).hexdigest()
    r = open_reader("lmdb", shards["lmdb"])
    assert r._env is None  # nothing open until it is used: nothing to carry across fork
    assert len(r) == len(records) and r[-1].key == records[-1].key
    parent_env = r._env
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _in_child(wfd, lambda: f"{_jpeg_digest(r)} {r._env is not parent_env}")
    os.close(wfd)
    with os.fdopen(rfd) as f:
        got = f.read()
    assert os.waitpid(pid, 0)[1] == 0, got
    assert got == f"{want} True"  # the child read everything through its own environment
    assert _jpeg_digest(r) == want and r._env is parent_env  # the parent's is untouched
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.read(0)


def test_lmdb_layout_is_the_verified_one(records: list[Record], tmp_path: Path) -> None:
    """`normalize` rewrites pages by mdb.c's private layout: a new LMDB must be checked again
    (then update VERIFIED_LMDB_VERSION). This fails loudly when py-lmdb brings another one."""
    assert lmdb.version(lib_version=lmdb_fmt.LMDB_ENGINE) == lmdb_fmt.VERIFIED_LMDB_VERSION
    with get_writer("lmdb", tmp_path / "a.lmdb") as w:
        for r in records * 40:
            w.add(r)
    path = w.close().path
    before = path.read_bytes()
    with lmdb.open(str(path), subdir=False, readonly=True, lock=False) as env:
        assert env.lib_version() == lmdb_fmt.VERIFIED_LMDB_VERSION  # written by that engine
    assert lmdb_fmt.normalize(path)[1] == hashlib.sha256(before).hexdigest()  # a fixed point
    # LMDB's own compacting copy of a normalized file normalizes back to the same bytes
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    env.copy(str(tmp_path / "b.lmdb"), compact=True)
    env.close()
    lmdb_fmt.normalize(tmp_path / "b.lmdb")
    assert (tmp_path / "b.lmdb").read_bytes() == before
    with open_reader("lmdb", path) as r:
        assert [x.jpeg for x in r] == [x.jpeg for x in records * 40]


def test_lmdb_normalize_refuses_another_data_format(shards: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "v2.lmdb"
    data = bytearray(shards["lmdb"].read_bytes())
    struct.pack_into("<I", data, 20, 2)  # meta page: data-format version 2
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not the one normalize was verified for"):
        lmdb_fmt.normalize(bad)
    assert bad.read_bytes() == bytes(data)  # refused before any byte was written
