"""End-to-end packer builds on real data: coco128 in every format, resume, verify, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from packer.build import BuildError, StrictFailure, build_dataset
from packer.format import FORMATS, MANIFEST_NAME, LabelArrays, read_manifest
from packer.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def packed(coco128, tmp_path_factory) -> dict[str, Path]:
    """coco128 packed once per format (320 px keeps it quick)."""
    out = {}
    for fmt in FORMATS:
        d = tmp_path_factory.mktemp(fmt) / "shards"
        build_dataset(coco128, d, fmt=fmt, size=320, workers=2)
        out[fmt] = d
    return out


def test_small_split_is_spread_evenly_over_min_shards(tmp_path):
    """12 images and --min-shards 8 give 8 shards of 1-2 samples (not 6 of 2); 3 give 3 of 1."""
    src = Path(__file__).resolve().parents[1] / "samples" / "coco"
    m = build_dataset(src, tmp_path / "o", size=64, workers=1).manifest
    sizes = {k: [sh.num_samples for sh in s.shards] for k, s in m.splits.items()}
    n = {k: s.num_samples for k, s in m.splits.items()}
    for split, counts in sizes.items():
        assert len(counts) == min(n[split], 8) and max(counts) - min(counts) <= 1, (split, counts)
    m = build_dataset(src, tmp_path / "p", size=64, workers=1, min_shards=5, splits=["train2017"]).manifest
    assert [sh.num_samples for sh in m.splits["train2017"].shards] == [3, 2, 3, 2, 2]


def test_manifest_and_report_reconcile(packed):
    for fmt, d in packed.items():
        m = read_manifest(d)
        assert m.format == fmt and m.size == 320 and len(m.names) == 80
        assert m.source["layout"] == "coco"
        assert list(m.splits) == ["train2017"]
        s = m.splits["train2017"]
        assert s.num_samples == 128
        assert len(s.shards) == (1 if fmt == "lmdb" else 8)  # small splits still get --min-shards shards
        report = json.loads((d / "report.json").read_text())
        t = report["totals"]
        assert t["images"]["found"] == 128 == t["images"]["packed"]
        assert t["boxes"]["dropped"]["crowd"] == 10  # coco128 holds 10 iscrowd annotations
        assert t["boxes"]["found"] == 939
        assert t["boxes"]["packed"] + sum(t["boxes"]["dropped"].values()) == 939
        assert s.num_boxes == t["boxes"]["packed"]
        labels = LabelArrays.load(d / s.labels)
        assert np.bincount(labels.cls, minlength=80).tolist() == s.class_counts
        assert max(labels.hw.max(1)) == 320


def test_label_arrays_equal_shards_and_verify(packed):
    for d in packed.values():
        res = verify_dataset(d, deep=True)
        assert res.ok, res.errors
        assert res.checked_records == 128 and res.decoded_images == 128


def test_formats_hold_the_same_samples(packed):
    from _pack_util import read_samples

    seen = {fmt: read_samples(d) for fmt, d in packed.items()}
    assert len(seen["tfrecord"]["train2017"]) == 128
    assert seen["tfrecord"] == seen["wds"] == seen["lmdb"]  # same order, labels, sizes and JPEG bytes


def test_tf_data_reads_built_shards_and_index_tools_agree(packed, tmp_path):
    from _tf_tool import tf_read

    m = read_manifest(packed["tfrecord"])
    rows = tf_read([packed["tfrecord"] / sh.path for sh in m.splits["train2017"].shards], tmp_path)
    assert len(rows) == 128 and all(r["canonical"] for r in rows)
    assert all(len(r["boxes"]) == 4 * len(r["cls"]) for r in rows)
    labels = LabelArrays.load(packed["tfrecord"] / m.splits["train2017"].labels)
    assert [r["key"] for r in rows] == labels.keys.tolist()  # shard order = label-array order
    assert sum(len(r["cls"]) for r in rows) == m.splits["train2017"].num_boxes

    # DALI's own index tools agree with ours on every built shard
    for fmt, tool in (("tfrecord", "tfrecord2idx"), ("wds", "wds2idx")):
        mm = read_manifest(packed[fmt])
        for sh in mm.splits["train2017"].shards:
            ref = packed[fmt] / (sh.path + ".ref")
            subprocess.run([str(BIN / tool), str(packed[fmt] / sh.path), str(ref)], check=True, capture_output=True)
            assert ref.read_bytes() == (packed[fmt] / sh.index).read_bytes(), sh.path
            ref.unlink()


def test_output_is_identical_whatever_the_workers(coco128, tmp_path):
    a, b = tmp_path / "w1", tmp_path / "w2"
    build_dataset(coco128, a, fmt="wds", size=256, workers=1, shard_size=40)
    build_dataset(coco128, b, fmt="wds", size=256, workers=2, shard_size=40)
    assert _tree_digest(a) == _tree_digest(b)


def test_flipped_byte_is_caught(packed, tmp_path):
    import shutil

    for fmt in FORMATS:
        d = tmp_path / fmt
        shutil.copytree(packed[fmt], d)
        sh = read_manifest(d).splits["train2017"].shards[-1]
        p = d / sh.path
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        res = verify_dataset(d)
        assert not res.ok
        assert any("sha256 mismatch" in e for e in res.errors), res.errors


def test_output_folder_rules(coco128, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not empty"):
        build_dataset(coco128, user, size=128, splits=["train2017"], workers=1)
    assert (user / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    build_dataset(coco128, out, fmt="wds", size=128, workers=1)
    with pytest.raises(BuildError, match="--overwrite"):
        build_dataset(coco128, out, fmt="wds", size=128, workers=1)
    (out / "mine.txt").write_text("keep me too")
    build_dataset(coco128, out, fmt="tfrecord", size=128, workers=1, overwrite=True)
    assert read_manifest(out).format == "tfrecord"
    assert (out / "mine.txt").exists()
    assert not list(out.rglob("*.tar"))  # the old format's shards are gone
    with pytest.raises(BuildError, match="contains the source"):
        build_dataset(coco128, coco128.parent, size=128)


def test_killed_build_leaves_no_manifest_and_resumes(coco128, tmp_path):
    """A real SIGKILL mid-build: no manifest; --resume keeps the finished shards and
    ends byte-identical to an uninterrupted build."""
    out = tmp_path / "killed"
    cmd = [str(BIN / "packer"), "build", str(coco128), "-o", str(out), "--format", "tfrecord", "--size", "320",
           "--shard-size", "8", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".packer-state"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(state.glob("*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(state.glob("*.npz"))) >= 3, "build finished before it could be killed"
    assert not (out / MANIFEST_NAME).exists()

    r = subprocess.run(cmd + ["--resume", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["resumed_shards"] >= 3
    assert verify_dataset(out).ok

    clean = tmp_path / "clean"
    build_dataset(coco128, clean, fmt="tfrecord", size=320, shard_size=8, workers=1)
    da, db = _tree_digest(out), _tree_digest(clean)
    da.pop("report.json"), db.pop("report.json")  # holds the source path only; compared below
    assert da.keys() == db.keys()
    assert {k: v for k, v in da.items() if k != MANIFEST_NAME} == {k: v for k, v in db.items() if k != MANIFEST_NAME}
    ma, mb = json.loads((out / MANIFEST_NAME).read_text()), json.loads((clean / MANIFEST_NAME).read_text())
    assert ma == mb


@pytest.mark.parametrize("fmt,stop_at", [("tfrecord", 2), ("lmdb", 1)])
def test_interrupt_in_process_then_resume(coco128, tmp_path, fmt, stop_at):
    out = tmp_path / "int"
    calls = []

    def stop(split, info):
        calls.append(info)
        if len(calls) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset(coco128, out, fmt=fmt, size=128, workers=2, on_shard=stop)
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(BuildError, match="--overwrite"):
        build_dataset(coco128, out, fmt=fmt, size=128, workers=2)
    res = build_dataset(coco128, out, fmt=fmt, size=128, workers=2, resume=True)
    assert res.resumed_shards == stop_at
    assert res.manifest.splits["train2017"].num_samples == 128
    assert verify_dataset(out).ok
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_bad_input_report(tmp_path):
    from _bad_input import make_bad_coco, make_bad_yolo

    for make in (make_bad_yolo, make_bad_coco):
        src = tmp_path / make.__name__
        expected = make(src)
        out = tmp_path / (make.__name__ + "-out")
        res = build_dataset(src, out, fmt="wds", size=128, workers=2)
        report = json.loads((out / "report.json").read_text())
        t = report["totals"]
        assert t["images"]["found"] == t["images"]["packed"] + sum(t["images"]["skipped"].values())
        assert t["boxes"]["found"] == t["boxes"]["packed"] + sum(t["boxes"]["dropped"].values())
        got = {**t["images"]["skipped"], **t["boxes"]["dropped"], **t["fixes"], **t["warnings"]}
        for reason, n in expected["reasons"].items():
            assert got.get(reason) == n, (make.__name__, reason, got)
        listed = {(p["kind"], p["reason"]) for p in report["problems"]}
        assert {r for _, r in listed} >= set(expected["reasons"])
        assert verify_dataset(out, deep=True).ok
        assert res.manifest.splits  # the good images were packed
        with pytest.raises(StrictFailure):
            build_dataset(src, tmp_path / (make.__name__ + "-strict"), size=128, workers=1, strict=True)
        assert not (tmp_path / (make.__name__ + "-strict") / MANIFEST_NAME).exists()


def _packer(*args, cwd=None):
    return subprocess.run([str(BIN / "packer"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "120"})


def test_cli_exactly_as_typed(tmp_path):
    """`packer build coco/ --format tfrecord --size 704` with the default ./shards output."""
    import shutil

    shutil.copytree(ROOT / "samples" / "coco", tmp_path / "coco")
    r = _packer("build", "coco/", "--format", "tfrecord", "--size", "704", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "packed coco -> tfrecord" in r.stdout and "img/s" in r.stdout
    m = read_manifest(tmp_path / "shards")
    assert set(m.splits) == {"train2017", "val2017"}
    info = _packer("info", "shards", "--json", cwd=tmp_path)
    assert info.returncode == 0 and json.loads(info.stdout)["splits"]["val2017"]["num_samples"] == 4
    human = _packer("info", "shards", cwd=tmp_path)
    assert "train2017" in human.stdout and "person" in human.stdout
    assert _packer("verify", "shards", cwd=tmp_path).returncode == 0


def test_cli_chroma_444_is_recorded_and_written(tmp_path):
    """`packer build --chroma 444`: the manifest records it, re-encoded shard JPEGs are 4:4:4 and
    verify --deep passes; an unknown value is a one-line usage error."""
    from _pack_util import read_samples
    from PIL import Image

    r = _packer("build", str(ROOT / "samples" / "coco"), "-o", str(tmp_path / "s"), "--size", "160",
                "--chroma", "444", "--format", "wds")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "s")
    assert m.options["chroma"] == "444"
    assert _packer("verify", str(tmp_path / "s"), "--deep").returncode == 0
    jpegs = [row[-1] for rows in read_samples(tmp_path / "s").values() for row in rows]
    assert jpegs and all([(h, v) for _, h, v, _ in Image.open(io.BytesIO(j)).layer] == [(1, 1)] * 3 for j in jpegs)
    bad = _packer("build", str(ROOT / "samples" / "coco"), "-o", str(tmp_path / "b"), "--chroma", "422")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_auto_chroma_follows_the_boxes_and_is_reported(tmp_path):
    """The default --chroma auto: every re-encoded image is 4:4:4 exactly when most of its boxes are
    small in the stored image (images.pick_chroma), and the summary counts how each image was stored."""
    from _pack_util import read_samples
    from PIL import Image

    r = _packer("build", str(ROOT / "samples" / "coco"), "-o", str(tmp_path / "s"), "--size", "160", "--json")
    assert r.returncode == 0, r.stderr
    stored = json.loads(r.stdout)["images"]["stored"]
    assert read_manifest(tmp_path / "s").options["chroma"] == "auto"
    seen = {"420": 0, "444": 0}
    for rows in read_samples(tmp_path / "s").values():
        for _key, _src, h, w, _oh, _ow, _cls, boxes, jpeg in rows:
            areas = np.frombuffer(boxes, np.float32).reshape(-1, 4)[:, 2:].prod(1) * h * w
            want = "444" if len(areas) and np.median(areas) < 32 * 32 else "420"
            got = "444" if [(a, b) for _, a, b, _ in Image.open(io.BytesIO(jpeg)).layer] == [(1, 1)] * 3 else "420"
            assert got == want
            seen[got] += 1
    assert seen["420"] and seen["444"] and stored == seen  # both kinds occur in this set at 160 px
    human = _packer("build", str(ROOT / "samples" / "coco"), "-o", str(tmp_path / "s"), "--size", "160", "--overwrite")
    assert f"{seen['420']} re-encoded 4:2:0, {seen['444']} re-encoded 4:4:4" in human.stdout


def test_cli_usage_errors_are_one_line(tmp_path):
    cases = [
        ("build", str(tmp_path / "nope")),
        ("build", str(ROOT / "samples" / "coco"), "--format", "zip"),
        ("build", str(tmp_path)),  # an empty folder: no layout to detect
        ("verify", str(tmp_path)),  # not a packed dataset
        ("build", str(ROOT / "samples" / "coco"), "--shard-bytes", "lots"),
        ("build", str(ROOT / "samples" / "coco"), "--seed", "-1"),
        ("preview", str(tmp_path), "--seed", "-1"),
        ("preview", str(tmp_path), "-o", ""),  # would silently mean the current folder
        ("convert", str(tmp_path), "-o", "", "--format", "wds"),
    ]
    for args in cases:
        r = _packer(*args, "-o", str(tmp_path / "o")) if args[0] == "build" else _packer(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o").exists()  # nothing was started, so no unfinished build to trip over later


def test_cli_strict_exit_1(tmp_path):
    from _bad_input import make_bad_yolo

    make_bad_yolo(tmp_path / "bad")
    r = _packer("build", str(tmp_path / "bad"), "-o", str(tmp_path / "o"), "--strict", "--workers", "1")
    assert r.returncode == 1
    assert "--strict" in r.stderr and "truncated" in r.stderr
    r = _packer("build", str(tmp_path / "bad"), "-o", str(tmp_path / "o2"), "--strict", "--workers", "1", "--json")
    d = json.loads(r.stdout)  # --json: one object on stdout even when --strict fails
    assert r.returncode == 1 and d["ok"] is False and any("truncated" in p for p in d["problems"])


def test_packed_labels_equal_ultralytics_convert_coco(packed, coco128, tmp_path):
    """The label arrays of every format equal ultralytics' convert_coco on the same json."""
    from trainer.offline import setup_offline

    setup_offline()
    from ultralytics.data.converter import convert_coco

    convert_coco(str(coco128 / "annotations"), str(tmp_path / "conv"), use_segments=False, cls91to80=True)
    theirs = {}
    for p in (tmp_path / "conv" / "labels" / "train2017").glob("*.txt"):
        rows = [ln.split() for ln in p.read_text().splitlines() if ln.strip()]
        theirs[p.stem] = np.array(rows, dtype=np.float64).reshape(-1, 5)
    for d in packed.values():
        la = LabelArrays.load(d / "train2017" / "labels.npz")
        for i, src in enumerate(la.sources):
            cls, boxes = la.labels(i)
            ours = np.column_stack([cls, boxes]).astype(np.float64)
            t = theirs.get(Path(src).stem, np.zeros((0, 5)))  # no file = no annotations
            assert ours.shape == t.shape, src
            np.testing.assert_allclose(ours, t, atol=1e-6, rtol=0)


def test_library_call_from_an_unguarded_script_stops_with_the_fix(tmp_path):
    """forkserver workers re-import the caller's script: a build_dataset() call without a
    __main__ guard must not start a second build in each worker, and must say what to do."""
    src = Path(__file__).resolve().parents[1] / "samples" / "coco"
    script = tmp_path / "pack.py"
    script.write_text("from packer.build import build_dataset\n"
                      f"build_dataset({str(src)!r}, {str(tmp_path / 'out')!r}, size=64, workers=2)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 1
    assert 'packer: error: a script that calls build_dataset() with workers > 1 needs the call under `if __name__ == "__main__":`' in p.stderr
    assert "packer.pool.WorkerDied: a worker process ended abruptly" in p.stderr  # the parent: a PackerError
    assert "being written by another packer run" not in p.stderr  # no worker started a build of its own
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from packer.build import build_dataset\nif __name__ == '__main__':\n"
                       f"    r = build_dataset({str(src)!r}, {str(tmp_path / 'ok')!r}, size=64, workers=2,"
                       " splits='train2017')\n    print(sorted(r.manifest.splits))\n")
    p = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "['train2017']", p.stderr  # a str is one split name


def test_strict_passes_stock_coco_whose_only_drops_are_crowd_boxes(coco128, tmp_path):
    """coco128's only dropped boxes are its 10 iscrowd=1 regions, dropped by choice as ultralytics does:
    --strict must let such a dataset through, while the report still counts them."""
    res = build_dataset(coco128, tmp_path / "o", size=64, workers=2, strict=True)
    assert res.report["totals"]["boxes"]["dropped"] == {"crowd": 10}
    assert {(p["kind"], p["reason"]) for p in res.report["problems"]} == {("box", "crowd")}
    assert (tmp_path / "o" / MANIFEST_NAME).is_file()
