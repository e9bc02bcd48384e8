"""Labels as ultralytics reads them: pose datasets (kpt_shape), COCO duplicates and orphan
annotations, data.yaml validation (alias bombs included), and reports that never quote a
file. Each case builds its own fixture; builds are real and their reports reconcile."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from _bad_input import checked_build, cli_exit, tiny_jpeg

from packer.labels import parse_yolo
from packer.sample import ProcessOptions, process_candidate
from packer.sources.detect import SourceError, detect_source

SECRET = "AKIA-MARKER-7d1c2b-do-not-leak"
POSE = {"tiger-pose": (12, 2), "dog-pose": (24, 3), "coco-pose": (17, 3)}  # ultralytics' datasets


def _img(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_jpeg(seed))
    return path


def _label(ds: Path, split: str, stem: str, text: str) -> Path:
    p = ds / "labels" / split / f"{stem}.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p




def _ultralytics_labels(img: Path, lbl: Path, nc: int, nkpt: int, ndim: int, keypoint: bool) -> np.ndarray:
    from trainer.offline import setup_offline

    setup_offline()
    from ultralytics.data.utils import verify_image_label

    out = verify_image_label((str(img), str(lbl), "", keypoint, nc, nkpt, ndim, False))
    assert out[1] is not None, out[-1]  # ultralytics accepted the file
    return out[1]


def _pose_line(rng: np.random.Generator, cls: int, nkpt: int, ndim: int) -> str:
    box = [rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4)]
    kpts = []
    for _ in range(nkpt):
        kpts += [rng.uniform(0, 1), rng.uniform(0, 1)] + ([float(rng.integers(0, 3))] if ndim == 3 else [])
    return f"{cls} " + " ".join(f"{v:.6g}" for v in box + kpts)


# ---------------------------------------------------------------------------------- pose


@pytest.mark.parametrize("name", POSE)
def test_pose_lines_give_the_boxes_ultralytics_loads(tmp_path, name):
    nkpt, ndim = POSE[name]
    rng = np.random.default_rng(nkpt)
    text = "\n".join(_pose_line(rng, c, nkpt, ndim) for c in (0, 1, 0)) + "\n"
    img = _img(tmp_path / "images" / "a.jpg")
    lbl = _label(tmp_path, "", "a", text)
    ours = parse_yolo(text, "a.jpg", nc=2, kpt_shape=(nkpt, ndim))
    assert ours.found == 3 and not ours.problems
    got = np.column_stack([ours.cls, ours.boxes])
    for keypoint in (True, False):  # a pose task, and a detect task on a pose dataset
        theirs = _ultralytics_labels(img, lbl, 2, nkpt, ndim, keypoint)
        np.testing.assert_allclose(got, theirs, atol=1e-6, rtol=0)
    if ndim == 2:  # without kpt_shape, 29 columns are a polygon to ultralytics and to us alike
        poly = parse_yolo(text, "a.jpg", nc=2)
        theirs = _ultralytics_labels(img, lbl, 2, 0, 0, False)
        np.testing.assert_allclose(np.column_stack([poly.cls, poly.boxes]), theirs, atol=1e-6, rtol=0)
        assert not np.allclose(poly.boxes, ours.boxes)  # which is why kpt_shape matters


def test_pose_lines_with_other_column_counts_are_named(tmp_path):
    rng = np.random.default_rng(0)
    lines = [_pose_line(rng, 0, 17, 3),  # coco-pose: 56 columns, kept
             "0 0.5 0.5 0.2 0.2",  # a plain box line in a pose dataset
             _pose_line(rng, 0, 12, 2),  # tiger-pose line: 29 columns
             "0 0.5 0.5 0.2 0.2 " + " ".join(["x"] * 51)]  # 56 columns, not numeric
    res = parse_yolo("\n".join(lines), "a.jpg", nc=1, kpt_shape=(17, 3))
    assert res.found == 4 and len(res.cls) == 1
    assert [(p.reason, p.detail) for p in res.problems] == [
        ("bad_line", "line 2: 5 columns (expected 56 for kpt_shape [17, 3])"),
        ("bad_line", "line 3: 29 columns (expected 56 for kpt_shape [17, 3])"),
        ("bad_line", "line 4: not numeric"),
    ]


def _pose_dataset(ds: Path, kpt: tuple[int, int]) -> int:
    rng = np.random.default_rng(1)
    for i in range(3):
        _img(ds / "images" / "train" / f"p{i}.jpg", seed=i)
        _label(ds, "train", f"p{i}", "\n".join(_pose_line(rng, i % 2, *kpt) for _ in range(i + 1)) + "\n")
    (ds / "data.yaml").write_text(f"path: .\ntrain: images/train\nnames: [a, b]\nkpt_shape: [{kpt[0]}, {kpt[1]}]\n"
                                  "flip_idx: []\n")
    return 1 + 2 + 3


def test_pose_dataset_detection_carries_kpt_shape(tmp_path):
    _pose_dataset(tmp_path / "ds", (17, 3))
    s = detect_source(tmp_path / "ds")
    assert {c.kpt_shape for c in s.splits["train"]} == {(17, 3)}
    assert any("kpt_shape [17, 3]" in n for n in s.notes)


def test_pose_dataset_builds_every_box(tmp_path):
    n = _pose_dataset(tmp_path / "ds", (17, 3))
    t = checked_build(tmp_path / "ds", tmp_path / "out")["totals"]
    assert t["boxes"] == {"found": n, "packed": n, "dropped": {}}


# ---------------------------------------------------------------------------------- COCO


def _coco(root: Path, images: list, anns: list) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for im in images:
        if isinstance(im, dict) and not (root / "train" / im["file_name"]).exists():
            _img(root / "train" / im["file_name"], seed=im["id"])
    p = root / "annotations" / "instances_train.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return p


def test_coco_duplicate_image_id_is_one_clear_line(tmp_path, capsys):
    ims = [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}, {"id": 7, "file_name": "c.jpg"}]
    _coco(tmp_path / "coco", ims, [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(SourceError, match="image id 7 "):
        detect_source(tmp_path / "coco")
    out = tmp_path / "out"
    code, err = cli_exit(["build", str(tmp_path / "coco"), "-o", str(out), "--workers", "1"], capsys)
    assert code == 2 and "image id 7" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_coco_same_file_name_twice_and_orphans_are_counted(tmp_path):
    ims = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
           {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
           {"id": 3, "file_name": "a.jpg", "width": 64, "height": 48}]  # the same file again
    box = {"category_id": 1, "bbox": [4, 4, 20, 20]}
    anns = [{"id": 1, "image_id": 1, **box}, {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 20, 10, 10]},
            {"id": 3, "image_id": 2, **box}, {"id": 4, "image_id": 3, **box},
            {"id": 5, "image_id": 99, **box}, {"id": 6, **box},  # orphans: no such image, no image_id
            5]  # not an object
    _coco(tmp_path / "coco", ims, anns)
    report = checked_build(tmp_path / "coco", tmp_path / "out")
    t = report["totals"]
    assert t["images"] == {"found": 3, "packed": 2, "skipped": {"duplicate_image": 1}, "stored": {"source": 2}}
    assert t["boxes"]["found"] == len(anns)  # reconciles against the json
    assert t["boxes"] == {"found": 7, "packed": 3,
                          "dropped": {"image_skipped": 1, "orphan_annotation": 2, "bad_line": 1}}
    orphan = [p for p in report["problems"] if p["reason"] == "orphan_annotation"]
    assert [(p["source"], p["count"]) for p in orphan] == [("annotations/instances_train.json", 2)]
    dup = [p for p in report["problems"] if p["reason"] == "duplicate_image"]
    assert [p["source"] for p in dup] == ["train/a.jpg"]


# ----------------------------------------------------------------------------- data.yaml

BILLION_LAUGHS = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(10)
) + "train: images/train\nnames: *l9\n"
MERGE_BOMB = "m0: &m0 {a: 1, b: 2}\n" + "".join(  # merge keys (<<) copy mappings when built
    f"m{i}: &m{i} {{<<: *m{i - 1}, x{i}: *m{i - 1}, y{i}: *m{i - 1}}}\n" for i in range(1, 40)
) + "train: images/train\nnc: 1\n"

BAD_YAML = {
    "unparseable": "train: [images/train\nnames: {0: a\n",
    "not a mapping": "- train\n- images/train\n",
    "nc zero": "train: images/train\nnc: 0\n",
    "nc negative": "train: images/train\nnc: -2\nnames: []\n",
    "nc string": "train: images/train\nnc: '3'\n",
    "nc float": "train: images/train\nnc: 2.5\n",
    "nc bool": "train: images/train\nnc: true\n",
    "names disagree": "train: images/train\nnc: 3\nnames: [a, b]\n",
    "names gap": "train: images/train\nnames: {0: a, 2: b}\n",
    "names nested": "train: images/train\nnames: [[a, b], c]\n",
    "names empty": "train: images/train\nnames: []\n",
    "kpt_shape short": "train: images/train\nnames: [a]\nkpt_shape: [17]\n",
    "kpt_shape dim": "train: images/train\nnames: [a]\nkpt_shape: [17, 4]\n",
    "kpt_shape text": "train: images/train\nnames: [a]\nkpt_shape: 17x3\n",
    "split entry": "train: {a: b}\nnames: [a]\n",
    "path not a path": "path: [1, 2]\ntrain: images/train\nnames: [a]\n",
    "path with NUL": 'path: "a\\0b"\ntrain: images/train\nnames: [a]\n',
    "path missing": "path: nowhere\ntrain: images/train\nnames: [a]\n",
    "billion laughs": BILLION_LAUGHS,
    "merge bomb": MERGE_BOMB,
    "recursive alias": "train: images/train\nnames: &n [a, *n]\n",
    "no split keys, bad nc": "nc: zero\n",
}


@pytest.mark.parametrize("case", BAD_YAML)
def test_broken_data_yaml_in_src_is_one_clear_line(tmp_path, capsys, case):
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.jpg")
    _label(ds, "train", "a", "0 0.5 0.5 0.2 0.2\n")
    (ds / "data.yaml").write_text(BAD_YAML[case])
    tracemalloc.start()
    try:
        with pytest.raises(SourceError) as e:
            detect_source(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20  # aliases are never expanded into memory
    assert "\n" not in str(e.value) and "data.yaml" in str(e.value)
    out = tmp_path / "out"
    code, err = cli_exit(["build", str(ds), "-o", str(out), "--workers", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_data_yaml_without_splits_names_the_folder_classes(tmp_path):
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.jpg")
    _label(ds, "train", "a", "1 0.5 0.5 0.2 0.2\n")
    (ds / "data.yaml").write_text("names: [cat, dog]\n")
    (ds / "hyp.yaml").write_text("lr0: [0.01\n")  # some other broken yaml: not the dataset's, ignored
    s = detect_source(ds)
    assert s.layout == "yolo-dirs" and s.names == ["cat", "dog"]
    assert any("hyp.yaml" in n for n in s.notes)
    t = checked_build(ds, tmp_path / "out")["totals"]
    assert t["boxes"] == {"found": 1, "packed": 1, "dropped": {}}


# ------------------------------------------------------------------ reports never quote


def _secret_dataset(ds: Path, outside: Path) -> None:
    _img(ds / "images" / "train" / "a.jpg")
    _label(ds, "train", "a", f"aws_secret_access_key = {SECRET}\n0 0.5 {SECRET} 0.1 0.1\n{SECRET} 0.5 0.5 0.1 0.1\n"
                             f"0 0.5 0.5 0.1 0.1 {SECRET}\n0 0.5 0.5 0.2 0.2\n")
    _img(ds / "images" / "train" / "b.jpg", seed=1)
    outside.mkdir()
    (outside / "credentials").write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    (ds / "labels" / "train" / "b.txt").symlink_to(outside / "credentials")
    (ds / "data.yaml").write_text("train: images/train\nnames: [a]\n")


def test_reports_and_strict_output_never_quote_label_lines(tmp_path, capsys):
    ds = tmp_path / "ds"
    _secret_dataset(ds, tmp_path / "home")
    report = checked_build(ds, tmp_path / "out")
    text = (tmp_path / "out" / "report.json").read_text()
    assert SECRET not in text and "aws_secret" not in text
    details = sorted(p["detail"] for p in report["problems"] if p["source"] == "images/train/a.jpg")
    assert details == ["line 1: not numeric", "line 2: not numeric", "line 3: not numeric", "line 4: not numeric"]
    code, err = cli_exit(["build", str(ds), "-o", str(tmp_path / "strict"), "--strict", "--workers", "1"], capsys)
    assert code == 1 and "line 2: not numeric" in err and SECRET not in err
    assert SECRET not in (tmp_path / "strict" / "report.json").read_text()
    # followed on purpose, the credentials file is read as labels and still never quoted
    s = detect_source(ds, follow_symlinks=True)
    res = [process_candidate(c, ProcessOptions(size=64, nc=1)) for c in s.splits["train"]]
    assert all(SECRET not in p.detail and "aws" not in p.detail for r in res for p in r.problems)
    assert sum(p.reason == "bad_line" for p in res[1].problems) == 2


def test_coco_and_yaml_errors_never_quote_the_file(tmp_path, capsys):
    ims = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": SECRET},
            {"id": 2, "image_id": 1, "category_id": SECRET, "bbox": [1, 1, 5, 5]},
            {"id": 3, "image_id": 1, "category_id": [SECRET], "bbox": [1, 1, 5, 5]}]
    _coco(tmp_path / "coco", ims, anns)
    report = checked_build(tmp_path / "coco", tmp_path / "out")
    assert report["totals"]["boxes"]["dropped"] == {"bad_line": 1, "class_out_of_range": 2}
    assert SECRET not in (tmp_path / "out" / "report.json").read_text()
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.jpg")
    for bad in (f"train: images/train\nnames: [a]\n{SECRET}: [: x\n", f"train: images/train\nnc: {SECRET}\n",
                f"train: images/train\nnames: !!python/object:{SECRET} {{}}\n",
                f"train: images/train\nnames: {{0: a, {SECRET}: b}}\n"):
        (ds / "data.yaml").write_text(bad)
        code, err = cli_exit(["build", str(ds), "-o", str(tmp_path / "o2"), "--workers", "1"], capsys)
        assert code == 2 and "data.yaml" in err and SECRET not in err, err


def test_coco_ids_spelled_as_strings_or_floats_still_match(tmp_path):
    """Exports of other tools mix "338", 338 and 338.0 for one image id: the boxes stay with their image
    (keyed apart they became orphan_annotation and the image a background)."""
    ims = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
           {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]
    box = {"category_id": 1, "bbox": [4, 4, 20, 20]}
    anns = [{"id": 1, "image_id": 1, **box}, {"id": 2, "image_id": "2", **box},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 20, 10, 10]}]
    path = _coco(tmp_path / "coco", ims, anns)
    d = json.loads(path.read_text())
    d["images"][0]["id"], d["images"][1]["id"] = "1", 2.0
    path.write_text(json.dumps(d))
    t = checked_build(tmp_path / "coco", tmp_path / "out")["totals"]
    assert t["boxes"]["packed"] == 3 and "orphan_annotation" not in t["boxes"]["dropped"], t["boxes"]
    d["images"].append({"id": 1, "file_name": "b.jpg", "width": 64, "height": 48})  # "1" and 1: one id, ambiguous
    path.write_text(json.dumps(d))
    with pytest.raises(SourceError, match="image id 1 is used by more than one image"):
        detect_source(tmp_path / "coco")


def test_a_box_too_thin_for_float32_is_dropped_as_zero_size():
    """w = 1e-46 is above 0 in Python's floats but 0 once stored as float32: labels.npz would then hold a
    box of no size, which the readers refuse. It is dropped and counted instead."""
    from packer.labels import clean_boxes

    cls, boxes, problems = clean_boxes([(0, 0.5, 0.5, 1e-46, 0.2, "line 1"), (1, 0.5, 0.5, 0.2, 0.2, "line 2")],
                                       nc=2, source="a.jpg")
    assert cls.tolist() == [1] and len(boxes) == 1
    assert [(p.kind, p.reason) for p in problems] == [("box", "zero_size")]
