"""Resume never mixes two sources: the journal's fingerprint (options, ordered candidates with
size/mtime, label files, COCO annotations) is compared first; a damaged journal is one line.
Real interrupted builds of copies of samples/yolo and samples/coco (64 px)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from packer.build import BuildError, build_dataset
from packer.format import MANIFEST_NAME
from packer.output import STATE_DIR
from packer.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPTS = {"size": 64, "workers": 1, "shard_size": 3}


class Stop(Exception):
    pass


def _interrupted(src: Path, out: Path, **kw) -> None:
    """A build stopped after its first finished shard (its journal stays)."""

    def stop(split, info):
        raise Stop

    with pytest.raises(Stop):
        build_dataset(src, out, on_shard=stop, **{**OPTS, **kw})
    assert (out / STATE_DIR / "state.json").is_file() and not (out / MANIFEST_NAME).exists()


def _cli_resume(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "packer"), "build", str(src), "-o", str(out), "--size", "64", "--workers", "1",
                           "--shard-size", "3", "--no-progress", *extra], capture_output=True, text=True)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


@pytest.fixture
def yolo(tmp_path) -> Path:
    src = tmp_path / "yolo"
    shutil.copytree(ROOT / "samples" / "yolo", src)
    return src


def test_changed_yolo_source_is_refused_with_counts(yolo, tmp_path):
    out = tmp_path / "out"
    _interrupted(yolo, out)
    images, labels = yolo / "images" / "train", yolo / "labels" / "train"
    shutil.copy(images / "000000000086.jpg", images / "added.jpg")  # 1 added
    (images / "000000000142.jpg").unlink()  # 1 removed
    (labels / "000000000294.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # 1 modified (its label file)
    with pytest.raises(BuildError, match=r"source changed .*\(1 added, 1 removed, 1 modified\).*--overwrite"):
        build_dataset(yolo, out, resume=True, **OPTS)
    line = _one_line(_cli_resume(yolo, out, "--resume"))
    assert "1 added, 1 removed, 1 modified" in line and "--overwrite" in line
    assert not (out / MANIFEST_NAME).exists()
    res = build_dataset(yolo, out, overwrite=True, **OPTS)
    assert res.manifest.splits["train"].num_samples == 12 and verify_dataset(out).ok


def test_touched_image_counts_as_modified(yolo, tmp_path):
    out = tmp_path / "out"
    _interrupted(yolo, out)
    img = yolo / "images" / "val" / "000000000250.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime: stat says changed
    with pytest.raises(BuildError, match=r"0 added, 0 removed, 1 modified"):
        build_dataset(yolo, out, resume=True, **OPTS)


def test_unchanged_source_resumes_to_the_same_bytes(yolo, tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    _interrupted(yolo, out)
    res = build_dataset(yolo, out, resume=True, **OPTS)
    assert res.resumed_shards == 1
    build_dataset(yolo, clean, **OPTS)
    files = sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (clean / f).read_bytes() for f in files if f != "report.json")


def test_changed_coco_annotations_are_refused(tmp_path):
    src = tmp_path / "coco"
    shutil.copytree(ROOT / "samples" / "coco", src)
    out = tmp_path / "out"
    _interrupted(src, out)
    ann = src / "annotations" / "instances_val2017.json"
    d = json.loads(ann.read_text())
    d["annotations"][0]["bbox"][0] += 5  # one box moved: that image's sample changes
    ann.write_text(json.dumps(d))
    with pytest.raises(BuildError, match=r"0 added, 0 removed, 1 modified"):
        build_dataset(src, out, resume=True, **OPTS)


@pytest.mark.parametrize("change", [{"quality": 80}, {"max_pixels": 1000}, {"follow_symlinks": True},
                                    {"splits": ["train"]}])
def test_other_options_are_refused(yolo, tmp_path, change):
    out = tmp_path / "out"
    _interrupted(yolo, out)
    with pytest.raises(BuildError, match="other options .*--overwrite"):
        build_dataset(yolo, out, resume=True, **{**OPTS, **change})


@pytest.mark.parametrize("damage", ["garbage", "list", "types", "piece", "empty"])
def test_damaged_journal_is_one_line(yolo, tmp_path, damage):
    out = tmp_path / "out"
    _interrupted(yolo, out)
    state = out / STATE_DIR / "state.json"
    d = json.loads(state.read_text())
    if damage == "garbage":
        state.write_bytes(b"\x00{not json")
    elif damage == "list":
        state.write_text(json.dumps([d]))
    elif damage == "types":
        d["splits"]["train"][0]["end"] = "3"
        state.write_text(json.dumps(d))
    elif damage == "piece":
        next((out / STATE_DIR).glob("train-00000.json")).write_text("{")
    else:
        state.write_text("")
    if damage == "garbage":  # the command line: one line, exit 2
        line = _one_line(_cli_resume(yolo, out, "--resume"))
        assert "damaged" in line and "--overwrite" in line
    else:
        with pytest.raises(BuildError, match="damaged.*--overwrite"):
            build_dataset(yolo, out, resume=True, **OPTS)
    build_dataset(yolo, out, overwrite=True, **OPTS)
    assert verify_dataset(out).ok and not (out / STATE_DIR).exists()
