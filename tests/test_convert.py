"""`packer convert`: format round trips keep samples, labels and JPEG bytes (samples/coco, 96 px)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _pack_util import read_samples

from packer.build import build_dataset
from packer.convert import ConvertError, convert_dataset
from packer.format import MANIFEST_NAME, read_manifest
from packer.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "samples" / "coco"
BIN = Path(sys.executable).parent
OPTS = {"size": 96, "workers": 1, "min_shards": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("conv") / "tfrecord"
    build_dataset(SRC, d, fmt="tfrecord", **OPTS)
    return d


def test_round_trip_through_all_formats_is_lossless(tmp_path, original):
    want = read_samples(original)
    m0 = read_manifest(original)
    prev = original
    for fmt in ("wds", "lmdb", "tfrecord"):
        out = tmp_path / fmt
        m = convert_dataset(prev, out, fmt)
        res = verify_dataset(out, deep=True)
        assert res.ok, (fmt, res.errors)
        assert res.checked_records == 16
        assert m.format == fmt and m.options["fmt"] == fmt
        assert m.options["converted_from"] == {"format": read_manifest(prev).format, "path": str(prev), "shard_size": None}
        assert read_samples(out) == want, fmt  # same keys, order, labels, sizes and JPEG bytes
        for split, info in m.splits.items():
            assert (info.num_samples, info.num_boxes, info.class_counts) == (
                m0.splits[split].num_samples, m0.splits[split].num_boxes, m0.splits[split].class_counts)
            shards = [sh.num_samples for sh in info.shards]
            assert shards == ([info.num_samples] if fmt == "lmdb" else [sh.num_samples for sh in m0.splits[split].shards])
        assert (out / "report.json").read_bytes() == (original / "report.json").read_bytes()
        prev = out
    # lmdb joined the shards but recorded their sizes, so the last tfrecord has the original boundaries:
    # every shard, index file, labels.npz and the report are byte-identical to the original build
    a, b = _files(original), _files(prev)
    assert sorted(a) == sorted(b)
    assert [k for k in a if k != MANIFEST_NAME and a[k] != b[k]] == []
    ma, mb = json.loads(a[MANIFEST_NAME]), json.loads(b[MANIFEST_NAME])
    assert mb["options"].pop("converted_from")["format"] == "lmdb"
    assert ma == mb


def test_convert_to_lmdb_equals_a_direct_lmdb_build(tmp_path, original):
    direct = tmp_path / "direct"
    build_dataset(SRC, direct, fmt="lmdb", **OPTS)
    conv = tmp_path / "conv"
    convert_dataset(original, conv, "lmdb")
    for split in ("train2017", "val2017"):
        for name in ("data.lmdb", "labels.npz"):
            assert (conv / split / name).read_bytes() == (direct / split / name).read_bytes()


def test_reshard(tmp_path, original):
    out = tmp_path / "wds5"
    m = convert_dataset(original, out, "wds", shard_size=5)
    assert [sh.num_samples for sh in m.splits["train2017"].shards] == [5, 5, 2]
    assert [sh.num_samples for sh in m.splits["val2017"].shards] == [4]
    assert m.options["converted_from"]["shard_size"] == 5
    assert verify_dataset(out).ok
    assert read_samples(out) == read_samples(original)


def test_refusals_and_overwrite(tmp_path, original):
    out = tmp_path / "out"
    convert_dataset(original, out, "wds")
    with pytest.raises(ConvertError, match="already holds a packed dataset; pass --overwrite"):
        convert_dataset(original, out, "lmdb")
    m = convert_dataset(original, out, "lmdb", overwrite=True)
    assert m.format == "lmdb" and verify_dataset(out).ok
    assert sorted(p.name for p in (out / "train2017").iterdir()) == ["data.lmdb", "labels.npz"]  # old tars gone
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty and is not a packed dataset"):
        convert_dataset(original, other, "wds", overwrite=True)
    with pytest.raises(ConvertError, match="contains the source"):
        convert_dataset(original, original, "wds", overwrite=True)
    with pytest.raises(ConvertError, match="does not apply to lmdb"):
        convert_dataset(original, tmp_path / "x", "lmdb", shard_size=4)


def test_corrupt_source_is_refused(tmp_path, original):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(original, bad)
    shard = bad / read_manifest(bad).splits["train2017"].shards[1].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="train2017-00001.tfrecord: source shard does not match its manifest"):
        convert_dataset(bad, out, "wds")
    assert not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.rglob(".*.tmp")]  # the aborted shard left no temp file
    r = subprocess.run([str(Path(sys.executable).parent / "packer"), "convert", str(bad), "-o", str(tmp_path / "o2"),
                        "--format", "wds"], capture_output=True, text=True)
    assert r.returncode == 1 and "source shard does not match" in r.stderr  # the data failed, not the request
    with pytest.raises(ConvertError, match="unfinished build or conversion; pass --overwrite"):
        convert_dataset(original, out, "wds")
    convert_dataset(original, out, "wds", overwrite=True)
    assert verify_dataset(out).ok


def test_cli(tmp_path, original):
    out = tmp_path / "cli"
    cmd = [str(BIN / "packer"), "convert", str(original), "--format", "wds", "-o", str(out)]
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["format"], s["from"], s["splits"]) == ("wds", "tfrecord", {"train2017": 12, "val2017": 4})
    assert s["shards"] == len(list(out.rglob("*.tar")))
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "pass --overwrite" in r.stderr and r.stderr.strip().count("\n") == 0
