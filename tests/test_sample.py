"""process_candidate over the bad-input fixtures: every reason counted, totals reconcile,
EXIF images upright with boxes on their object, pass-through, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from _bad_input import RED, make_bad_coco, make_bad_yolo

from packer.format import check_key, make_key
from packer.labels import parse_yolo
from packer.sample import ProcessOptions, SampleResult, process_candidate
from packer.sources.base import BOX_REASONS, FIXES, IMAGE_REASONS, WARNINGS
from packer.sources.detect import Source, detect_source

BUILDERS = {"yolo": make_bad_yolo, "coco": make_bad_coco}


def _run(kind: str, tmp_path: Path, **opts) -> tuple[Source, dict, dict[str, SampleResult]]:
    root = tmp_path / kind
    root.mkdir()
    expected = BUILDERS[kind](root)
    src = detect_source(root)
    o = ProcessOptions(nc=len(src.names), **opts)
    results = {c.source: process_candidate(c, o) for cands in src.splits.values() for c in cands}
    return src, expected, results


def _tally(results: dict[str, SampleResult]) -> dict:
    by_kind: dict[str, Counter] = {k: Counter() for k in ("image", "box", "fix", "warning")}
    for r in results.values():
        for p in r.problems:
            by_kind[p.kind][p.reason] += p.count
    packed = [r.record for r in results.values() if r.record is not None]
    return {
        "images_found": len(results),
        "images_packed": len(packed),
        "images_skipped": dict(by_kind["image"]),
        "boxes_found": sum(r.boxes_found for r in results.values()),
        "boxes_packed": sum(len(r.cls) for r in packed),
        "boxes_dropped": dict(by_kind["box"]),
        "fixes": dict(by_kind["fix"]),
        "warnings": dict(by_kind["warning"]),
    }


@pytest.mark.parametrize("kind", ["yolo", "coco"])
def test_bad_input_counts_and_reconciliation(kind, tmp_path):
    src, exp, results = _run(kind, tmp_path)
    assert src.layout == exp["layout"] and src.names == exp["names"]
    assert {k: len(v) for k, v in src.splits.items()} == exp["splits"]
    got = _tally(results)
    assert got == {k: exp[k] for k in got}
    assert got["images_found"] == got["images_packed"] + sum(got["images_skipped"].values())
    assert got["boxes_found"] == got["boxes_packed"] + sum(got["boxes_dropped"].values())
    for r in results.values():
        assert r.boxes_found == (len(r.record.cls) if r.record else 0) + sum(
            p.count for p in r.problems if p.kind == "box")
        vocab = {"image": IMAGE_REASONS, "box": BOX_REASONS, "fix": FIXES, "warning": WARNINGS}
        assert all(p.reason in vocab[p.kind] and p.detail for p in r.problems)
        if r.record is None:
            assert sum(p.kind == "image" for p in r.problems) == 1
        else:
            rec = r.record
            assert rec.key == make_key(rec.source)
            check_key(rec.key)
            img = cv2.imdecode(np.frombuffer(rec.jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (rec.height, rec.width, 3)
            b = rec.boxes
            assert ((b[:, :2] - b[:, 2:] / 2 >= 0) & (b[:, :2] + b[:, 2:] / 2 <= 1 + 1e-6)).all()
            assert (b[:, 2:] > 0).all() and ((rec.cls >= 0) & (rec.cls < len(src.names))).all()
    assert exp["dotted"] in results and results[exp["dotted"]].record is not None
    assert "." not in results[exp["dotted"]].record.key and " " not in results[exp["dotted"]].record.key


@pytest.mark.parametrize("kind", ["yolo", "coco"])
def test_exif_rotated_comes_out_upright_with_box_on_object(kind, tmp_path):
    _, exp, results = _run(kind, tmp_path)
    rec = results[exp["exif"]["source"]].record
    assert (rec.height, rec.width, rec.orig_height, rec.orig_width) == (96, 64, 96, 64)
    np.testing.assert_allclose(rec.boxes[0], exp["exif"]["box"], atol=1e-5)
    img = cv2.imdecode(np.frombuffer(rec.jpeg, np.uint8), cv2.IMREAD_COLOR).astype(int)
    cx, cy, w, h = rec.boxes[0] * [rec.width, rec.height, rec.width, rec.height]
    x1, y1, x2, y2 = (int(round(v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    inner = img[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
    assert np.abs(inner - RED).mean() < 12  # the box covers the red rectangle
    outside = np.ones(img.shape[:2], bool)
    outside[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = False
    assert np.abs(img[outside] - (200, 200, 200)).mean() < 12  # and the rest is background


@pytest.mark.parametrize("kind", ["yolo", "coco"])
def test_passthrough_and_determinism(kind, tmp_path):
    src, exp, results = _run(kind, tmp_path)
    rec = results[exp["passthrough"]].record
    assert rec.jpeg == (src.root / exp["passthrough"]).read_bytes()
    again = {c.source: process_candidate(c, ProcessOptions(nc=len(src.names))) for c in src.splits["train"]}
    for s, r in again.items():
        a, b = r.record, results[s].record
        assert (a is None) == (b is None)
        if a is not None:
            assert a.jpeg == b.jpeg and np.array_equal(a.cls, b.cls) and np.array_equal(a.boxes, b.boxes)
        assert [(p.kind, p.reason, p.detail, p.count) for p in r.problems] == [
            (p.kind, p.reason, p.detail, p.count) for p in results[s].problems]


def test_resize_keeps_normalized_boxes_and_keep_crowd(tmp_path):
    src, _, full = _run("coco", tmp_path)
    o = ProcessOptions(nc=len(src.names), size=32, quality=80, keep_crowd=True)
    for c in src.splits["train"]:
        r = process_candidate(c, o)
        if r.record is None:
            continue
        assert max(r.record.height, r.record.width) == 32
        ref = full[c.source].record
        if c.source.endswith("good.jpg"):  # the crowd box is now kept
            assert len(r.record.cls) == len(ref.cls) + 1
            assert not any(p.reason == "crowd" for p in r.problems)
        else:
            np.testing.assert_array_equal(r.record.boxes, ref.boxes)
        assert r.boxes_found == len(r.record.cls) + sum(p.count for p in r.problems if p.kind == "box")


def test_parse_yolo_rules():
    r = parse_yolo("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n0 -0.05 0.5 0.2 0.2\n0 inf 0 1 1\n", "a", 2)
    assert r.found == 5 and len(r.cls) == 2 and r.dropped == 3
    np.testing.assert_allclose(r.boxes[1], [0.025, 0.5, 0.05, 0.2], atol=1e-7)  # clipped to x in [0, 0.05]
    assert [p.reason for p in r.problems] == ["duplicate", "class_out_of_range", "clipped", "non_finite"]
    assert any("line 2" in p.detail for p in r.problems if p.reason == "duplicate")
    # x + w == 1 exactly in float noise is not a fix
    assert not parse_yolo("0 0.9 0.5 0.2 0.2\n", "a", 1).problems


def test_missing_image_with_label_counts_its_boxes(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "labels" / "gone.txt").write_text("0 0.5 0.5 0.1 0.1\n0 0.4 0.4 0.1 0.1\n")
    (root / "list.txt").write_text("./images/gone.jpg\n")
    (root / "data.yaml").write_text("train: list.txt\nnames: [a]\n")
    (c,) = detect_source(root).splits["train"]
    r = process_candidate(c, ProcessOptions(nc=1))
    assert r.record is None and r.boxes_found == 2
    assert [(p.kind, p.reason, p.count) for p in r.problems] == [("image", "missing_image", 1),
                                                                 ("box", "image_skipped", 2)]


def test_coco_unknown_category_is_named(tmp_path):
    src, _, results = _run("coco", tmp_path)
    (p,) = [p for r in results.values() for p in r.problems if p.reason == "class_out_of_range"]
    assert "category_id 999" in p.detail and p.source == "train/alpha.png"


def test_bad_options_are_value_errors():
    for kw in ({"size": 0}, {"quality": 101}, {"nc": -1}):
        with pytest.raises(ValueError):
            ProcessOptions(**kw)
