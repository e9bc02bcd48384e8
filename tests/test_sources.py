"""Layout detection (COCO, data.yaml, images/<split>/, flat images/) and COCO conversion
checked against ultralytics' own converter."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from _bad_input import _images

from packer.labels import coco_to_yolo
from packer.sample import ProcessOptions, process_candidate
from packer.sources.coco import category_names, find_coco_jsons, load_coco
from packer.sources.detect import SourceError, detect_source
from packer.sources.yolo import img2label_path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
JPEG = cv2.imencode(".jpg", np.full((16, 24, 3), 120, np.uint8))[1].tobytes()


def _ultralytics():
    from trainer.offline import setup_offline

    setup_offline()
    import ultralytics.data.converter as conv
    import ultralytics.data.utils as du

    return conv, du


def _img(path: Path, label: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG)
    if label is not None:
        lp = Path(img2label_path(str(path)))
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text(label)


def _summary(src) -> dict:
    return {k: [c.source for c in v] for k, v in src.splits.items()}


# ------------------------------------------------------------------------------ layouts


def test_samples_coco_and_yolo():
    coco = detect_source(SAMPLES / "coco")
    assert coco.layout == "coco" and coco.root == (SAMPLES / "coco").resolve()
    assert {k: len(v) for k, v in coco.splits.items()} == {"train2017": 12, "val2017": 4}
    assert len(coco.names) == 80 and coco.names[0] == "person"
    yolo = detect_source(SAMPLES / "yolo")
    assert yolo.layout == "yolo-yaml" and yolo.names == coco.names
    assert {k: len(v) for k, v in yolo.splits.items()} == {"train": 12, "val": 4}
    for cands in (*coco.splits.values(), *yolo.splits.values()):
        assert [c.source for c in cands] == sorted(c.source for c in cands)
        assert all(c.path and os.path.isabs(c.path) and c.reject is None for c in cands)
    assert sum(c.label_file is None for c in yolo.splits["val"]) == 1  # the background image
    # SRC may also be the yaml or one instances json
    assert _summary(detect_source(SAMPLES / "yolo" / "data.yaml")) == _summary(yolo)
    one = detect_source(SAMPLES / "coco" / "annotations" / "instances_val2017.json")
    assert one.layout == "coco" and _summary(one) == {"val2017": _summary(coco)["val2017"]}
    assert list(detect_source(SAMPLES / "coco", splits=["val2017"]).splits) == ["val2017"]


def test_yolo_dirs_and_flat(tmp_path):
    d = tmp_path / "dirs"
    _img(d / "images" / "train" / "a.jpg", "0 0.5 0.5 0.1 0.1\n4 0.5 0.5 0.2 0.2\n")
    _img(d / "images" / "train" / "sub" / "b.PNG")  # nested, upper-case extension, no label
    _img(d / "images" / "val" / "c.jpeg", "1 0.5 0.5 0.1 0.1\n")
    (d / "images" / "train" / "readme.md").write_text("not an image")
    _img(d / "images" / "train" / ".hidden.jpg")  # hidden files and folders are skipped, as in ultralytics
    _img(d / "images" / "train" / ".cache" / "x.jpg")
    _img(d / "images" / ".ipynb_checkpoints" / "y.jpg")
    _img(d / "images" / "train" / "anim.GIF")  # not in ultralytics' IMG_FORMATS: left out, but said
    s = detect_source(d)
    assert s.layout == "yolo-dirs"
    assert _summary(s) == {"train": ["images/train/a.jpg", "images/train/sub/b.PNG"], "val": ["images/val/c.jpeg"]}
    assert s.names == [f"class_{i}" for i in range(5)] and any("inferred" in n for n in s.notes)
    assert "train: 1 of 2 images have no label file (kept as background)" in s.notes
    assert any(n.startswith("images/train: 1 .gif files left out") for n in s.notes), s.notes
    a = s.splits["train"][0]
    assert a.label_file == str(d / "labels" / "train" / "a.txt") and s.splits["train"][1].label_file is None

    f = tmp_path / "flat"
    _img(f / "images" / "x.jpg", "0 0.5 0.5 0.1 0.1\n")
    _img(f / "images" / "y.jpg")
    (f / "classes.txt").write_text("cat\ndog\n")
    s = detect_source(f)
    assert s.layout == "yolo-flat" and s.names == ["cat", "dog"]
    assert _summary(s) == {"train": ["images/x.jpg", "images/y.jpg"]}


def test_label_lookup_is_ultralytics_rule(tmp_path):
    _, du = _ultralytics()
    paths = [str(tmp_path / "images" / "x" / "images" / "a.b.jpg"), str(tmp_path / "imgs" / "c.png"),
             str(tmp_path / "data" / "images" / "train" / "d e.JPG")]
    assert [img2label_path(p) for p in paths] == du.img2label_paths(paths)


def test_yaml_variants(tmp_path):
    root = tmp_path / "ds"
    for n in ("a", "b", "c"):
        _img(root / "images" / "train" / f"{n}.jpg", "0 0.5 0.5 0.1 0.1\n")
    _img(root / "extra" / "images" / "e.jpg", "1 0.5 0.5 0.1 0.1\n")
    _img(root / "images" / "val" / "v.jpg")
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    lists = root / "lists"
    lists.mkdir()
    # ultralytics' txt-list rule: "./x" is relative to the list file's folder
    (lists / "val.txt").write_text("\ufeff./../images/val/v.jpg\nimages/train/a.jpg\n../secret.jpg\n./gone.jpg\nx.txt\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: [images/train, extra/images]\nval: lists/val.txt\ntest: images/test\n"
        "names: {0: cat, 1: dog, '2': bird}\n"
    )
    s = detect_source(root)
    assert s.layout == "yolo-yaml" and s.names == ["cat", "dog", "bird"]
    assert _summary(s)["train"] == ["extra/images/e.jpg", "images/train/a.jpg", "images/train/b.jpg",
                                    "images/train/c.jpg"]
    val = {c.source: c for c in s.splits["val"]}
    assert set(val) == {"images/val/v.jpg", "images/train/a.jpg", "../secret.jpg", "lists/gone.jpg"}
    assert val["../secret.jpg"].reject == "path_outside_root" and val["../secret.jpg"].path is None
    assert val["lists/gone.jpg"].reject == "missing_image"
    assert val["images/train/a.jpg"].label_file and val["images/val/v.jpg"].label_file is None
    assert "test" not in s.splits and any("images/test" in n for n in s.notes)
    assert any("non-image" in n for n in s.notes)
    with pytest.raises(SourceError, match="test"):
        detect_source(root, splits=["train", "test"])

    # names as a list, path elsewhere, split entry escaping the root, nc only
    other = tmp_path / "cfg"
    other.mkdir()
    (other / "d.yaml").write_text(f"path: {root}\ntrain: [images/train, ../../etc]\nval: images/val\nnames: [x, y]\n")
    s = detect_source(other / "d.yaml")
    assert s.root == root.resolve() and s.names == ["x", "y"]
    assert ("../../etc", "path_outside_root") in [(c.source, c.reject) for c in s.splits["train"]]
    (other / "d.yaml").write_text(f"path: {root}\ntrain: ../../etc\nval: images/val\nnames: [x, y]\n")
    with pytest.raises(SourceError, match="split train: every image resolves outside"):  # not an empty split
        detect_source(other / "d.yaml")
    (other / "d.yaml").write_text(f"path: {root}\nval: images/val\nnc: 2\n")
    assert detect_source(other / "d.yaml").names == ["class_0", "class_1"]
    (other / "d.yaml").write_text(f"path: {root}\nval: images/val\nnames: {{0: a, 2: b}}\n")
    with pytest.raises(SourceError, match="names"):
        detect_source(other / "d.yaml")


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        detect_source(tmp_path / "nope")
    with pytest.raises(SourceError, match="could not detect layout"):
        detect_source(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        detect_source(tmp_path)
    with pytest.raises(SourceError, match=r"val.*found: train2017"):
        detect_source(SAMPLES / "coco", splits=["val"])
    bad = tmp_path / "c"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(SourceError, match="cannot read COCO"):
        detect_source(bad)
    moved = tmp_path / "moved"
    (moved / "images" / "train").mkdir(parents=True)
    (moved / "data.yaml").write_text(f"path: {tmp_path / 'empty'}\ntrain: images/train\nnames: [a]\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no images found under .*moved \(the dataset root .*empty, from data.yaml"):
        detect_source(moved)  # the message says where it looked, not only where the user pointed


def test_coco_lookup_places_and_escapes(tmp_path):
    import json

    root = tmp_path / "coco"
    _img(root / "images" / "val" / "a.jpg")
    _img(root / "pics" / "b.jpg")
    (tmp_path / "outside.jpg").write_bytes(JPEG)
    ims = [{"id": 1, "file_name": "a.jpg", "width": 24, "height": 16},
           {"id": 2, "file_name": "pics/b.jpg", "width": 24, "height": 16},
           {"id": 3, "file_name": "../outside.jpg", "width": 24, "height": 16},
           {"id": 4, "file_name": "/etc/hostname", "width": 24, "height": 16}]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": ims, "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    s = detect_source(root)
    got = {c.source: c.reject for c in s.splits["val"]}
    assert got == {"images/val/a.jpg": None, "pics/b.jpg": None, "../outside.jpg": "path_outside_root",
                   "/etc/hostname": "path_outside_root"}


# ------------------------------------------------------------------- COCO vs ultralytics


def test_category_mapping_equals_coco91_to_coco80(coco128):
    conv, _ = _ultralytics()
    names, splits, _ = load_coco(coco128, find_coco_jsons(coco128))
    import json

    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    ids, _ = category_names(data, coco128)
    table = conv.coco91_to_coco80_class()
    assert [table[i - 1] for i in ids] == list(range(80))
    assert len(names) == 80 and len(splits["train2017"]) == 128


def _read_yolo_dir(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(d.glob("*.txt")):
        rows = [list(map(float, ln.split())) for ln in p.read_text().splitlines() if ln.strip()]
        out[p.stem] = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return out


def _convert_coco(ann_dir: Path, tmp_path: Path) -> Path:
    conv, _ = _ultralytics()
    save = tmp_path / "converted"
    conv.convert_coco(str(ann_dir), str(save), use_segments=False, cls91to80=True)
    return save


def test_coco128_labels_equal_ultralytics_convert_coco(coco128, tmp_path):
    save = _convert_coco(coco128 / "annotations", tmp_path)
    theirs = _read_yolo_dir(save / "labels" / "train2017")
    src = detect_source(coco128)
    opts = ProcessOptions(nc=len(src.names))
    crowd_only, compared = 0, 0
    for c in src.splits["train2017"]:
        r = process_candidate(c, opts)
        stem = Path(c.source).stem
        if stem not in theirs:  # convert_coco writes no file for an image without annotations
            assert not c.coco_boxes and len(r.record.cls) == 0
            continue
        ours = np.column_stack([r.record.cls, r.record.boxes]).astype(np.float64)
        t = theirs[stem]
        assert ours.shape == t.shape, c.source  # same count per image (crowd left out by both)
        np.testing.assert_allclose(ours, t, atol=1e-6, rtol=0)  # convert_coco writes %g
        crowd_only += len(t) == 0
        compared += 1
    assert compared == 126 and sum(len(v) for v in theirs.values()) == 929


def test_samples_yolo_labels_match_convert_coco(tmp_path):
    save = _convert_coco(SAMPLES / "coco" / "annotations", tmp_path)
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        ours = _read_yolo_dir(SAMPLES / "yolo" / "labels" / split)
        theirs = _read_yolo_dir(save / "labels" / coco_split)
        assert ours.keys() == theirs.keys() and ours
        for k in ours:
            np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6, rtol=0)
    assert sorted(p.name for p in (SAMPLES / "yolo" / "images" / "val").iterdir()) == sorted(
        p.name for p in (SAMPLES / "coco" / "val2017").iterdir())


def test_coco_conversion_uses_decoded_size():
    # json says 100x50 but the image is 24x16: boxes are normalized by the real image
    res = coco_to_yolo([(0, 6, 4, 12, 8, 0)], 16, 24, "x.jpg", nc=1)
    np.testing.assert_allclose(res.boxes, [[0.5, 0.5, 0.5, 0.5]])


def test_copy_of_samples_with_spaces_in_root(tmp_path):
    root = tmp_path / "my data.v1"
    shutil.copytree(SAMPLES / "yolo", root)
    (root / "images" / "val" / "000000000338.jpg").rename(root / "images" / "val" / "a b.c.jpg")
    s = detect_source(root)
    assert "images/val/a b.c.jpg" in _summary(s)["val"]
    _ = _images  # fixture builder importable from here too
