"""Multi-machine packing: parts + `packer merge` equal a single-machine build (samples/coco, 96 px)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _pack_util import read_samples

from packer.build import BuildError, build_dataset
from packer.convert import convert_dataset
from packer.format import LABEL_FIELDS, MANIFEST_NAME, LabelArrays, read_manifest
from packer.parts import PartsError, merge_parts, part_range
from packer.verify import verify_dataset
from packer.writers import open_reader

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "samples" / "coco"
BIN = Path(sys.executable).parent
OPTS = {"size": 96, "workers": 1, "min_shards": 4}


def _pack_parts(dest: Path, n: int, fmt: str, **kw) -> None:
    for i in range(n):
        build_dataset(SRC, dest, fmt=fmt, num_parts=n, part=i, **{**OPTS, **kw})


def _labels_equal(a: LabelArrays, b: LabelArrays) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in LABEL_FIELDS if f not in ("shard", "pos"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """One single-machine build and one 2-part build + merge, per format (tfrecord, lmdb)."""
    base = tmp_path_factory.mktemp("parts")
    out = {}
    for fmt in ("tfrecord", "lmdb"):
        build_dataset(SRC, base / f"one-{fmt}", fmt=fmt, **OPTS)
        _pack_parts(base / f"two-{fmt}", 2, fmt)
        merge_parts(base / f"two-{fmt}")
        out[f"one-{fmt}"], out[f"two-{fmt}"] = base / f"one-{fmt}", base / f"two-{fmt}"
    return out


def test_part_ranges_tile_and_balance():
    for n in (0, 1, 4, 12, 13):
        for parts in (1, 2, 3, 5):
            rs = [part_range(n, i, parts) for i in range(parts)]
            assert rs[0][0] == 0 and rs[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(rs, rs[1:], strict=False))
            sizes = [b - a for a, b in rs]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("fmt", ["tfrecord", "lmdb"])
def test_merge_equals_single_build(built, fmt):
    one, two = built[f"one-{fmt}"], built[f"two-{fmt}"]
    res = verify_dataset(two, deep=True)
    assert res.ok, res.errors
    assert res.checked_records == 16 and res.decoded_images == 16
    m1, m2 = read_manifest(one), read_manifest(two)
    assert (m2.format, m2.size, m2.names, m2.source) == (m1.format, m1.size, m1.names, m1.source)
    assert {k: v for k, v in m2.options.items() if k != "parts"} == m1.options
    assert m2.options["parts"]["num_parts"] == 2
    for split in m1.splits:
        s1, s2 = m1.splits[split], m2.splits[split]
        assert (s2.num_samples, s2.num_boxes, s2.class_counts) == (s1.num_samples, s1.num_boxes, s1.class_counts)
        assert all(sh.path.startswith("parts/part-0000") for sh in s2.shards)
        # same samples in the same (pack-time shuffled) order, same labels and stored sizes
        assert _labels_equal(LabelArrays.load(one / s1.labels), LabelArrays.load(two / s2.labels))
    # same JPEG bytes per key, read back from the shards
    assert read_samples(one) == read_samples(two)
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r2["totals"] == r1["totals"] and r2["splits"] == r1["splits"] and r2["problems"] == r1["problems"]
    assert r2["totals"]["boxes"]["dropped"] == {"crowd": 1}  # the sample with a crowd box, found by one part
    assert r2["parts"] == ["parts/part-00000-of-00002", "parts/part-00001-of-00002"]


def test_lmdb_merge_lists_one_environment_per_part(built):
    two = built["two-lmdb"]
    m = read_manifest(two)
    s = m.splits["train2017"]
    assert [sh.path for sh in s.shards] == [f"parts/part-0000{i}-of-00002/train2017/data.lmdb" for i in range(2)]
    assert [sh.num_samples for sh in s.shards] == [6, 6]
    labels = LabelArrays.load(two / s.labels)
    assert labels.shard.tolist() == [0] * 6 + [1] * 6 and labels.pos.tolist() == list(range(6)) * 2
    readers = [open_reader("lmdb", two / sh.path) for sh in s.shards]
    try:
        for i in range(len(labels)):
            rec = readers[labels.shard[i]].read(int(labels.pos[i]))
            cls, boxes = labels.labels(i)
            assert rec.key == labels.keys[i] and np.array_equal(rec.cls, cls) and np.array_equal(rec.boxes, boxes)
    finally:
        for r in readers:
            r.close()
    # the trainer's record access resolves (shard, pos) into the right part's environment
    from trainer.data.common import open_split
    from trainer.data.torch_loader import RecordSource

    data = open_split(two, "train2017", verify=True)
    src = RecordSource(data)
    assert [src.read(int(labels.shard[i]), int(labels.pos[i])).key for i in range(len(labels))] == labels.keys.tolist()


def test_more_parts_than_images_and_convert_of_merged(tmp_path, built):
    """5 parts of a 4-image split: one part packs nothing there; the merge still equals one build."""
    dest = tmp_path / "five"
    _pack_parts(dest, 5, "lmdb")
    merge_parts(dest)
    assert verify_dataset(dest).ok
    val = read_manifest(dest).splits["val2017"]
    assert len(val.shards) == 4 and val.num_samples == 4  # the empty part has no data.lmdb
    assert read_samples(dest) == read_samples(built["one-lmdb"])
    # a merged lmdb (one environment per part) converts to tfrecord, one shard per environment
    conv = tmp_path / "conv"
    m = convert_dataset(dest, conv, "tfrecord")
    assert [sh.num_samples for sh in m.splits["val2017"].shards] == [1, 1, 1, 1]
    assert verify_dataset(conv).ok
    assert read_samples(conv) == read_samples(built["one-tfrecord"])
    # converting into one of the source's own part folders would delete the shards it reads
    part = next((dest / "parts").iterdir())
    with pytest.raises(BuildError, match="of the source dataset"):
        convert_dataset(dest, part, "wds", overwrite=True)
    assert verify_dataset(dest).ok


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_merge_refuses_missing_unfinished_and_mismatched_parts(tmp_path, built):
    two = built["two-tfrecord"]
    d = _copy(two, tmp_path / "missing")
    shutil.rmtree(d / "parts" / "part-00001-of-00002")
    with pytest.raises(PartsError, match=r"part 1 of 2 \(parts/part-00001-of-00002\) is missing"):
        merge_parts(d)

    d = _copy(two, tmp_path / "unfinished")
    (d / "parts" / "part-00000-of-00002" / MANIFEST_NAME).unlink()
    with pytest.raises(PartsError, match=r"part 0 of 2 .* is not finished .*--resume"):
        merge_parts(d)

    d = _copy(two, tmp_path / "quality")
    build_dataset(SRC, d, fmt="tfrecord", num_parts=2, part=1, quality=80, overwrite=True, **OPTS)
    assert not (d / MANIFEST_NAME).exists()  # rebuilding a part removes the stale merged manifest
    with pytest.raises(PartsError, match=r"part 1 of 2 .* option quality = 80 vs 95"):
        merge_parts(d)

    d = _copy(two, tmp_path / "mixed")
    build_dataset(SRC, d / "other", fmt="tfrecord", num_parts=3, part=0, **OPTS)  # another run's part
    shutil.move(d / "other" / "parts" / "part-00000-of-00003", d / "parts")
    with pytest.raises(PartsError, match="different --num-parts"):
        merge_parts(d)


def test_merge_refuses_overlapping_parts(tmp_path, built):
    d = _copy(built["two-tfrecord"], tmp_path / "range")
    mpath = d / "parts" / "part-00001-of-00002" / MANIFEST_NAME
    man = json.loads(mpath.read_text())
    man["options"]["parts"]["splits"]["train2017"]["start"] -= 1
    mpath.write_text(json.dumps(man))
    with pytest.raises(PartsError, match=r"part 1 of 2 .* range 5\.\.12 does not continue at 6"):
        merge_parts(d)

    d = _copy(built["two-tfrecord"], tmp_path / "dup")
    p0, p1 = (d / "parts" / f"part-0000{i}-of-00002" / "train2017" / "labels.npz" for i in range(2))
    la = LabelArrays.load(p1)
    la.keys = la.keys.astype(object)
    la.keys[0] = LabelArrays.load(p0).keys[3]
    la.keys = la.keys.astype(str)
    la.save(p1)
    with pytest.raises(PartsError, match=r"occurs 2 times \(parts 0, 1\)"):
        merge_parts(d)


def test_part_arguments_are_checked(tmp_path, built):
    with pytest.raises(PartsError, match="needs --part"):
        build_dataset(SRC, tmp_path / "a", num_parts=2, **OPTS)
    with pytest.raises(PartsError, match=r"within 0\.\.1"):
        build_dataset(SRC, tmp_path / "a", num_parts=2, part=2, **OPTS)
    with pytest.raises(PartsError, match="single-machine packed dataset"):
        build_dataset(SRC, built["one-tfrecord"], num_parts=2, part=0, **OPTS)
    with pytest.raises(PartsError, match="holds the merged dataset; pass --overwrite"):
        build_dataset(SRC, built["two-tfrecord"], num_parts=2, part=0, **OPTS)


def _packer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "packer"), *map(str, args)], capture_output=True, text=True)


def test_cli_parts_merge_verify(tmp_path, built):
    dest = tmp_path / "cli"
    for i in range(2):
        r = _packer("build", SRC, "-o", dest, "--size", "96", "--workers", "1", "--min-shards", "4",
                    "--num-parts", "2", "--part", i, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["out"] == str(dest / "parts" / f"part-0000{i}-of-00002")
    r = _packer("merge", dest, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["splits"] == {"train2017": 12, "val2017": 4}
    # the CLI and the library build the same bytes
    for split in ("train2017", "val2017"):
        assert (dest / split / "labels.npz").read_bytes() == (built["two-tfrecord"] / split / "labels.npz").read_bytes()
    assert _packer("verify", dest).returncode == 0
    shutil.rmtree(dest / "parts" / "part-00000-of-00002")
    r = _packer("merge", dest)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "part 0 of 2" in r.stderr
    r = _packer("build", SRC, "-o", tmp_path / "x", "--num-parts", "2")
    assert r.returncode == 2 and "needs --part" in r.stderr


def test_part_resumes_and_remerge_is_stable(tmp_path, built):
    dest = tmp_path / "resume"

    class Stop(Exception):
        pass

    def stop(split, info):
        raise Stop

    build_dataset(SRC, dest, fmt="tfrecord", num_parts=2, part=0, **OPTS)
    with pytest.raises(Stop):  # killed after its first shard
        build_dataset(SRC, dest, fmt="tfrecord", num_parts=2, part=1, on_shard=stop, **OPTS)
    with pytest.raises(PartsError, match="part 1 of 2 .* is not finished"):
        merge_parts(dest)
    res = build_dataset(SRC, dest, fmt="tfrecord", num_parts=2, part=1, resume=True, **OPTS)
    assert res.resumed_shards == 1
    merge_parts(dest)
    ref = built["two-tfrecord"]
    files = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    # the interrupted-and-resumed part and the merge give the same bytes as an uninterrupted run
    assert [f for f in files if (ref / f).read_bytes() != (dest / f).read_bytes()] == []
    before = {f: (dest / f).read_bytes() for f in files}
    merge_parts(dest)
    assert before == {f: (dest / f).read_bytes() for f in files}


@pytest.mark.parametrize("layout", ["coco", "yolo"])
def test_merge_refuses_parts_packed_from_other_annotations(tmp_path, layout):
    """A node with a stale annotation copy (same images, other boxes) must not merge silently."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(ROOT / "samples" / layout, a)
    shutil.copytree(a, b)
    if layout == "coco":
        ann = b / "annotations" / "instances_train2017.json"
        doc = json.loads(ann.read_text())
        doc["annotations"][0]["bbox"][0] += 3  # one box moved by 3 px: same image list, same classes
        ann.write_text(json.dumps(doc))
    else:
        lab = sorted((b / "labels").rglob("*.txt"), key=lambda p: p.stat().st_size)[-1]
        cls, *rest = lab.read_text().splitlines()[0].split()
        lab.write_text("\n".join([" ".join([str(1 - int(cls) % 2), *rest])] + lab.read_text().splitlines()[1:]))
    dest = tmp_path / "dest"
    build_dataset(a, dest, fmt="tfrecord", num_parts=2, part=0, **OPTS)
    build_dataset(b, dest, fmt="tfrecord", num_parts=2, part=1, **OPTS)
    with pytest.raises(PartsError, match=r"part 1 of 2 .* another image list or other annotations"):
        merge_parts(dest)
    build_dataset(a, dest, fmt="tfrecord", num_parts=2, part=1, overwrite=True, **OPTS)
    merge_parts(dest)  # the same annotations on both nodes merge
