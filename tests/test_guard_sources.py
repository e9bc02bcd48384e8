"""Odd files and hostile folders at discovery: symlinks leading out of SRC (and loops),
non-UTF-8 file names, COCO split names from json file names. Every case builds its own
fixture and runs the real build: totals reconcile and nothing is written outside -o."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from _bad_input import checked_build, checked_report, cli_exit, snapshot, tiny_jpeg
from _pack_util import read_samples

from packer.build import build_dataset
from packer.format import check_key, make_key
from packer.sources.detect import SourceError, detect_source
from packer.verify import verify_dataset

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

BOX = "0 0.5 0.5 0.25 0.25\n"
SECRET = "AKIA-MARKER-5f3e9c-do-not-leak"


def _img(path: Path, label: str | None = None, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_jpeg(seed))
    if label is not None:
        lp = Path(str(path).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}")).with_suffix(".txt")
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text(label)




def _linked_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A YOLO dataset whose images/train holds: 2 real images, a file symlink and a folder
    symlink leading outside, an image whose label file links to a secret outside, a loop
    back to images/ and an alias of a folder inside. Returns (dataset, outside folder)."""
    ds, outside = tmp_path / "ds", tmp_path / "outside"
    _img(ds / "images" / "train" / "a.jpg", BOX)
    _img(ds / "images" / "train" / "sub" / "c.jpg", BOX, seed=3)
    _img(outside / "x.jpg", seed=1)
    _img(outside / "more" / "y.jpg", seed=2)
    (outside / "secret.txt").write_text(SECRET + "\n")
    train = ds / "images" / "train"
    (train / "x.jpg").symlink_to(outside / "x.jpg")
    (train / "more").symlink_to(outside / "more", target_is_directory=True)
    _img(train / "b.jpg", seed=4)
    (ds / "labels" / "train" / "b.txt").symlink_to(outside / "secret.txt")
    (train / "loop").symlink_to(ds / "images", target_is_directory=True)  # images/train/loop/train/...
    (train / "alias").symlink_to(train / "sub", target_is_directory=True)  # same folder again
    (ds / "classes.txt").write_text("thing\n")
    return ds, outside


def test_symlinks_outside_root_are_skipped_and_counted(tmp_path):
    ds, _ = _linked_dataset(tmp_path)
    report = checked_build(ds, tmp_path / "out")
    t = report["totals"]
    assert t["images"]["packed"] == 2  # a.jpg and sub/c.jpg, once each despite the loop and the alias
    assert t["images"]["skipped"] == {"symlink_outside_root": 3}  # x.jpg, the folder more/, b.jpg
    skipped = {p["source"] for p in report["problems"] if p["reason"] == "symlink_outside_root"}
    assert skipped == {"images/train/x.jpg", "images/train/more", "images/train/b.jpg"}
    assert any("--follow-symlinks" in n and "symlink_outside_root" in n for n in report["notes"])
    packed = sorted(r[1] for r in read_samples(tmp_path / "out")["train"])
    assert packed == ["images/train/a.jpg", "images/train/sub/c.jpg"]
    assert SECRET not in (tmp_path / "out" / "report.json").read_text()


def test_follow_symlinks_packs_what_links_lead_to(tmp_path):
    ds, _ = _linked_dataset(tmp_path)
    s = detect_source(ds, follow_symlinks=True)
    got = {c.source: c.reject for c in s.splits["train"]}
    assert got == {"images/train/a.jpg": None, "images/train/sub/c.jpg": None, "images/train/x.jpg": None,
                   "images/train/more/y.jpg": None, "images/train/b.jpg": None}
    assert not any("--follow-symlinks" in n for n in s.notes)


def test_symlink_loop_is_walked_once(tmp_path):
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.jpg", BOX)
    (ds / "images" / "train" / "again").symlink_to(ds / "images" / "train", target_is_directory=True)
    (ds / "images" / "train" / "deep").mkdir()
    (ds / "images" / "train" / "deep" / "up").symlink_to(ds, target_is_directory=True)
    (ds / "images" / "train" / "a1.jpg").symlink_to("a2.jpg")  # a file loop: a broken image, counted
    (ds / "images" / "train" / "a2.jpg").symlink_to("a1.jpg")
    (ds / "classes.txt").write_text("thing\n")
    for follow in (False, True):
        s = detect_source(ds, follow_symlinks=follow)
        got = {c.source: c.reject for c in s.splits["train"]}
        assert got == {"images/train/a.jpg": None, "images/train/a1.jpg": "missing_image",
                       "images/train/a2.jpg": "missing_image"}
    report = checked_build(ds, tmp_path / "out")
    assert report["totals"]["images"] == {"found": 3, "packed": 1, "skipped": {"missing_image": 2}, "stored": {"source": 1}}


def test_every_image_behind_an_outside_symlink_is_one_clear_line(tmp_path, capsys):
    ds, store = tmp_path / "ds", tmp_path / "store"
    _img(store / "train" / "a.jpg")
    (ds / "images").mkdir(parents=True)
    (ds / "images" / "train").symlink_to(store / "train", target_is_directory=True)  # cluster style
    (ds / "classes.txt").write_text("thing\n")
    with pytest.raises(SourceError, match="--follow-symlinks"):
        detect_source(ds)
    assert [c.source for c in detect_source(ds, follow_symlinks=True).splits["train"]] == ["images/train/a.jpg"]
    code, err = cli_exit(["build", str(ds), "-o", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert code == 2 and "--follow-symlinks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_coco_image_symlinked_outside(tmp_path):
    root, outside = tmp_path / "coco", tmp_path / "elsewhere"
    _img(root / "train" / "a.jpg")
    _img(outside / "b.jpg", seed=1)
    (root / "train" / "b.jpg").symlink_to(outside / "b.jpg")
    ims = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
           {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10]}]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    report = checked_build(root, tmp_path / "out")
    t = report["totals"]
    assert t["images"]["skipped"] == {"symlink_outside_root": 1}
    assert t["boxes"] == {"found": 1, "packed": 0, "dropped": {"image_skipped": 1}}


# ------------------------------------------------------------------- non-UTF-8 file names


def _bytes_name_dataset(tmp_path: Path) -> Path:
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "plain.jpg", BOX)
    d = os.fsencode(ds / "images" / "train")
    with open(d + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 byte: not UTF-8
        f.write(tiny_jpeg(7))
    with open(os.fsencode(ds / "labels" / "train") + b"/caf\xe9.txt", "wb") as f:
        f.write(b"0 0.5 0.5 0.5 0.5\n")
    (ds / "classes.txt").write_text("thing\n")
    return ds


@pytest.mark.parametrize("fmt", ["wds", "tfrecord", "lmdb"])
def test_non_utf8_file_name_is_packed_with_escaped_source(tmp_path, fmt):
    ds = _bytes_name_dataset(tmp_path)
    out = tmp_path / "out"
    before = snapshot(tmp_path, out)
    build_dataset(ds, out, fmt=fmt, size=64, workers=1)
    assert snapshot(tmp_path, out) == before
    report = checked_report(out)
    assert report["totals"]["images"] == {"found": 2, "packed": 2, "skipped": {}, "stored": {"source": 2}}
    assert report["totals"]["boxes"]["packed"] == 2  # its label file was found and read
    rows = {r[1]: r for r in read_samples(out)["train"]}
    assert set(rows) == {"images/train/plain.jpg", "images/train/caf\\xe9.jpg"}
    key = rows["images/train/caf\\xe9.jpg"][0]
    assert key == make_key("images/train/caf\\xe9.jpg")
    check_key(key)
    assert verify_dataset(out, deep=True).ok


def test_coco_file_name_with_surrogate_escape_finds_the_file(tmp_path):
    root = tmp_path / "coco"
    _img(root / "train" / "ok.jpg")
    with open(os.fsencode(root / "train") + b"/caf\xe9.jpg", "wb") as f:
        f.write(tiny_jpeg(2))
    ims = [{"id": 1, "file_name": "ok.jpg", "width": 64, "height": 48},
           {"id": 2, "file_name": "caf\udce9.jpg", "width": 64, "height": 48},  # how Python names the byte
           {"id": 3, "file_name": "\ud800bad.jpg", "width": 64, "height": 48}]  # no such file
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": ims, "annotations": [], "categories": [{"id": 1, "name": "a\udcff"}]}))
    report = checked_build(root, tmp_path / "out")
    assert report["totals"]["images"] == {"found": 3, "packed": 2, "skipped": {"missing_image": 1}, "stored": {"source": 2}}
    assert {p["source"] for p in report["problems"]} == {"train/\\ud800bad.jpg"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["names"] == ["a\\xff"]


# ----------------------------------------------------------------- COCO split names


@pytest.mark.parametrize("name", ["instances_...json", "instances_.json", "instances_a b.json",
                                  "instances_x%2F..json"])
def test_coco_split_name_from_json_file_name_is_checked(tmp_path, capsys, name):
    root = tmp_path / "ds" / "coco"
    _img(root / "train" / "a.jpg")
    (root / "annotations").mkdir()
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (root / "annotations" / name).write_text(json.dumps(data))
    out = tmp_path / "ds" / "out"
    before = snapshot(tmp_path, out)
    for src in (root, root / "annotations" / name):
        with pytest.raises(SourceError, match="split name"):
            detect_source(src)
        code, err = cli_exit(["build", str(src), "-o", str(out), "--workers", "1"], capsys)
        assert code == 2 and "split name" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path, out) == before


def test_yolo_split_folder_names_are_checked(tmp_path):
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.jpg", BOX)
    _img(ds / "images" / "va l" / "b.jpg", BOX)
    with pytest.raises(SourceError, match="split name"):
        detect_source(ds)


def test_odd_entries_never_kill_a_build(tmp_path):
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.jpg", BOX)
    os.mkfifo(ds / "images" / "train" / "fifo.jpg")  # would block a reader forever
    (ds / "images" / "train" / "dir.jpg").mkdir()  # a folder with an image's name: walked, empty
    (ds / "list.txt").write_text("images/train/a.jpg\nimages/nul\x00.jpg\n" + "x" * 300 + ".jpg\n")
    (ds / "data.yaml").write_text("train: images/train\nval: list.txt\nnames: [a]\n")
    report = checked_build(ds, tmp_path / "out")
    assert report["splits"]["train"]["images"] == {"found": 2, "packed": 1, "skipped": {"missing_image": 1}, "stored": {"source": 1}}
    assert report["splits"]["val"]["images"] == {"found": 3, "packed": 1, "skipped": {"missing_image": 2}, "stored": {"source": 1}}

    root = tmp_path / "coco"
    ims = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "nul\x00.jpg"}, {"id": 3, "file_name": 5},
           {"id": 4, "file_name": "y" * 300 + ".jpg"}, {"id": 5}, {"id": [1], "file_name": "b.jpg"}]
    _img(root / "train" / "a.jpg")
    _img(root / "train" / "b.jpg", seed=1)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": ims, "annotations": [{"image_id": [1], "bbox": [1, 1, 2, 2], "category_id": 1}],
                    "categories": [{"id": 1, "name": "a"}]}))
    report = checked_build(root, tmp_path / "out2")
    assert report["totals"]["images"] == {"found": 6, "packed": 2, "skipped": {"missing_image": 4}, "stored": {"source": 2}}
    assert report["totals"]["boxes"] == {"found": 1, "packed": 0, "dropped": {"orphan_annotation": 1}}


def test_source_folder_with_non_utf8_name_packs(tmp_path: Path) -> None:
    """The SRC folder's own name is not UTF-8: manifest, report and journal still write."""
    from packer.format import read_manifest

    src = Path(os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"data\xe9")))
    shutil.copytree(SAMPLES / "yolo", src)
    out = tmp_path / "out"
    res = build_dataset(src, out, fmt="wds", size=64, workers=1)
    assert res.report["totals"]["images"]["packed"] > 0
    m = read_manifest(out)
    assert m.source["path"].endswith("data\\xe9")


def test_a_split_whose_every_image_is_outside_stops_the_build(tmp_path, capsys):
    """One split behind an outside symlink (or a data.yaml path outside the root) beside a good split
    would pack as an empty split: exit 2 with the hint, nothing written."""
    ds, store = tmp_path / "ds", tmp_path / "store"
    _img(store / "train" / "a.jpg", BOX)
    _img(ds / "images" / "val" / "v.jpg", BOX, seed=1)
    (ds / "images" / "train").symlink_to(store / "train", target_is_directory=True)
    (ds / "classes.txt").write_text("thing\n")
    code, err = cli_exit(["build", str(ds), "-o", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert code == 2 and "split train" in err and "--follow-symlinks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    yds = tmp_path / "yds"
    _img(yds / "images" / "val" / "v.jpg", BOX, seed=1)
    _img(tmp_path / "other" / "images" / "t.jpg", BOX)
    (yds / "data.yaml").write_text("train: ../other/images\nval: images/val\nnames: [thing]\n")
    code, err = cli_exit(["build", str(yds / "data.yaml"), "-o", str(tmp_path / "out2"), "--workers", "1"], capsys)
    assert code == 2 and "split train" in err and "inside the dataset root" in err, err
    assert not (tmp_path / "out2").exists()


def test_a_coco_category_id_given_twice_stops_the_build(tmp_path, capsys):
    """Two names for one id would shift every later class index: a silently wrong dataset."""
    root = tmp_path / "coco"
    shutil.copytree(SAMPLES / "coco", root)
    ann = root / "annotations" / "instances_val2017.json"
    d = json.loads(ann.read_text())
    d["categories"][1]["id"] = d["categories"][0]["id"]
    ann.write_text(json.dumps(d))
    code, err = cli_exit(["build", str(root), "-o", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert code == 2 and f"category id {d['categories'][0]['id']} appears more than once" in err
    assert not (tmp_path / "out").exists()
