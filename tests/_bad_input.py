"""Builders of small datasets full of bad input, with the counts a build must report.

`make_bad_yolo(root)` and `make_bad_coco(root)` write a dataset under `root` and return the
expected totals (hand-counted here, not computed by packer):

    {
      "layout": str, "names": [...], "splits": {split: images found},
      "images_found": int, "images_packed": int, "images_skipped": {reason: n},
      "boxes_found": int, "boxes_packed": int, "boxes_dropped": {reason: n},
      "fixes": {"clipped": n}, "warnings": {"size_mismatch": n},
      "reasons": {reason: n},                             # all of the above in one dict
      "exif": {"source": str, "box": [cx, cy, w, h]},   # upright image, box on a red rectangle
      "passthrough": str,                                 # source of a plain baseline JPEG
      "dotted": str,                                      # source with dots and spaces
    }

Images are tiny (<= 96 px) so processing the whole fixture takes well under a second.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

RED = (0, 0, 255)  # BGR


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth gradient with a little texture: compresses well, decodes unambiguously."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1)
    return np.clip(img + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray, list[float]]:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view).

    Returns (bytes, the upright BGR image, the YOLO box of the red rectangle in the upright
    image). The upright image is 64 wide x 96 tall; the rectangle is at x 8..32, y 56..88."""
    up = np.full((96, 64, 3), 200, np.uint8)
    up[56:88, 8:32] = RED
    raw = cv2.rotate(up, cv2.ROTATE_90_COUNTERCLOCKWISE)  # what the sensor stored
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _pil_bytes(Image.fromarray(raw[:, :, ::-1]), "JPEG", quality=95, exif=exif.tobytes())
    box = [(8 + 32) / 2 / 64, (56 + 88) / 2 / 96, 24 / 64, 32 / 96]
    return data, up, box


def _images() -> dict[str, bytes]:
    """The shared set of problem images (name -> bytes)."""
    good = _jpeg(_scene(48, 64, 1))
    gray = _pil_bytes(Image.fromarray(_scene(48, 64, 2)[:, :, 0]), "JPEG", quality=90)
    rgba = np.dstack([_scene(48, 64, 3), np.full((48, 64), 128, np.uint8)])
    deep = (_scene(48, 64, 4).astype(np.uint16) * 257)
    cmyk = _pil_bytes(Image.fromarray(_scene(48, 64, 5)[:, :, ::-1]).convert("CMYK"), "JPEG", quality=90)
    prog = _pil_bytes(Image.fromarray(_scene(48, 64, 6)[:, :, ::-1]), "JPEG", quality=90, progressive=True)
    trunc = _jpeg(_scene(48, 64, 7))
    return {
        "good.jpg": good,
        "gray.jpg": gray,
        "alpha.png": _png(rgba),
        "deep16.png": _png(deep),
        "cmyk.jpg": cmyk,
        "progressive.jpg": prog,
        "exif_rotated.jpg": exif_rotated_jpeg()[0],
        "my.photo v2 (1).jpg": _jpeg(_scene(48, 64, 8)),
        "nolabel.jpg": _jpeg(_scene(48, 64, 9)),
        "corrupt.jpg": b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9",
        "truncated.jpg": trunc[: len(trunc) // 2],
        "cut.png": _png(_scene(48, 64, 10))[:-12],  # IEND chunk cut off
        "empty.jpg": b"",
    }


def _with_reasons(d: dict) -> dict:
    """Add "reasons": every named count in one flat dict (reason names are unique)."""
    d["reasons"] = {**d["images_skipped"], **d["boxes_dropped"], **d["fixes"], **d["warnings"]}
    return d


def make_bad_yolo(root: Path) -> dict:
    """A YOLO dataset (data.yaml, 3 classes) with every kind of bad input; see module doc."""
    root = Path(root)
    imgs = _images()
    tr, va = root / "images" / "train", root / "images" / "val"
    ltr, lva = root / "labels" / "train", root / "labels" / "val"
    for d in (tr, va, ltr, lva):
        d.mkdir(parents=True, exist_ok=True)
    _, _, exif_box = exif_rotated_jpeg()
    labels = {  # train image -> label text (absent key = no label file)
        "good.jpg": "0 0.5 0.5 0.25 0.25\n0 0.5 0.5 0.25 0.25\n1 0.25 0.25 0.1 0.1\n",  # 1 duplicate
        "gray.jpg": "1 0.5 0.5 nan 0.2\n2 0.4 0.4 0.2 0.2\n",  # 1 non_finite
        "alpha.png": "\ufeff2 0.5 0.5 0.5 0.5\n\n",  # BOM and blank line: 1 good box
        "deep16.png": "7 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n1 1.5 1.5 0.2 0.2\n",
        # ^ 2 class_out_of_range, 1 clipped (kept), 1 out_of_bounds
        "cmyk.jpg": "1 0.5 0.5 0 0.2\n1 0.5 abc 0.1 0.1\n1 0.5 0.5 0.1\n1.5 0.5 0.5 0.1 0.1\n0 0.3 0.3 0.1 0.1\n",
        # ^ 1 zero_size, 3 bad_line, 1 good
        "progressive.jpg": "0 0.1 0.1 0.4 0.4 0.4 0.1\n",  # polygon (0.1..0.4 square) -> 1 good box
        "exif_rotated.jpg": "2 " + " ".join(f"{v:.6f}" for v in exif_box) + "\n",
        "my.photo v2 (1).jpg": "1 0.5 0.5 0.3 0.3\n",
        "corrupt.jpg": "0 0.5 0.5 0.1 0.1\n",  # image_skipped 1
        "truncated.jpg": "0 0.5 0.5 0.1 0.1\n1 0.5 0.5 0.2 0.2\n",  # image_skipped 2
        "cut.png": "",  # empty label file, image truncated: 0 boxes
    }
    for name, data in imgs.items():
        (tr / name).write_bytes(data)
        if name in labels:
            (ltr / name).with_suffix(".txt").write_text(labels[name], encoding="utf-8")
    # val: a .txt list with "./" entries, an escaping entry and a missing image
    (va / "v1.jpg").write_bytes(imgs["good.jpg"])
    (lva / "v1.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root.parent / "outside.jpg").write_bytes(imgs["good.jpg"])  # real file: must never be read
    (root / "val.txt").write_text("./images/val/v1.jpg\n../outside.jpg\n./images/val/missing.jpg\nnotes.md\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: val.txt\nnames:\n  0: cat\n  1: dog\n  2: box\n")
    return _with_reasons({
        "layout": "yolo-yaml",
        "names": ["cat", "dog", "box"],
        "splits": {"train": 13, "val": 3},
        "images_found": 16,
        "images_packed": 10,  # 9 decodable train images + v1.jpg
        "images_skipped": {"unreadable": 1, "truncated": 2, "empty_file": 1, "path_outside_root": 1,
                           "missing_image": 1},
        "boxes_found": 3 + 2 + 1 + 4 + 5 + 1 + 1 + 1 + 1 + 2 + 1,  # 22
        "boxes_packed": 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1,  # 10
        "boxes_dropped": {"duplicate": 1, "non_finite": 1, "class_out_of_range": 2, "out_of_bounds": 1,
                          "zero_size": 1, "bad_line": 3, "image_skipped": 3},
        "fixes": {"clipped": 1},
        "warnings": {},
        "exif": {"source": "images/train/exif_rotated.jpg", "box": exif_box},
        "passthrough": "images/train/good.jpg",
        "dotted": "images/train/my.photo v2 (1).jpg",
    })


def make_bad_coco(root: Path) -> dict:
    """A COCO dataset (instances_train.json, category ids 3, 7, 11) with every kind of bad
    input; see module doc."""
    root = Path(root)
    imgs = _images()
    img_dir = root / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for name, data in imgs.items():
        (img_dir / name).write_bytes(data)
    (root.parent / "escape.jpg").write_bytes(imgs["good.jpg"])  # real file: must never be read
    _, _, (ecx, ecy, ew, eh) = exif_rotated_jpeg()
    ex_box = [(ecx - ew / 2) * 64, (ecy - eh / 2) * 96, ew * 64, eh * 96]  # upright pixels
    # file_name -> (json width, height), [(category_id, bbox, iscrowd)]
    spec: dict[str, tuple[tuple[int, int], list]] = {
        "good.jpg": ((64, 48), [(3, [16, 12, 32, 24], 0), (3, [16, 12, 32, 24], 0), (7, [0, 0, 8, 8], 1),
                                (11, [40, 30, 10, 10], 0)]),  # 1 duplicate, 1 crowd, 2 kept
        "gray.jpg": ((64, 48), [(7, [60, 10, 20, 20], 0), (7, [70, 10, 5, 5], 0)]),  # clipped, out_of_bounds
        "alpha.png": ((64, 48), [(999, [1, 1, 5, 5], 0), (3, [1, 1, 0, 5], 0)]),  # class_out_of_range, zero_size
        "deep16.png": ((64, 48), [(3, "abc", 0), (11, [5, 5, 20, 20], 0)]),  # bad_line (bbox), 1 kept
        "cmyk.jpg": ((100, 100), [(7, [6.4, 4.8, 32, 24], 0)]),  # size_mismatch warning, 1 kept
        "progressive.jpg": ((64, 48), []),  # background
        "exif_rotated.jpg": ((96, 64), [(11, ex_box, 0)]),  # json has the raw (sideways) size
        "my.photo v2 (1).jpg": ((64, 48), [(3, [10, 10, 20, 20], 0)]),
        "nolabel.jpg": ((64, 48), []),
        "corrupt.jpg": ((64, 48), [(3, [1, 1, 5, 5], 0)]),  # image_skipped 1
        "truncated.jpg": ((64, 48), [(3, [1, 1, 5, 5], 0), (7, [2, 2, 5, 5], 1)]),  # image_skipped 2
        "cut.png": ((64, 48), []),
        "empty.jpg": ((64, 48), [(3, [1, 1, 5, 5], 0)]),  # image_skipped 1
        "../../escape.jpg": ((64, 48), [(3, [1, 1, 5, 5], 0)]),  # path_outside_root, image_skipped 1
        "missing.jpg": ((64, 48), [(3, [1, 1, 5, 5], 0)]),  # missing_image, image_skipped 1
    }
    _write_coco_json(root / "annotations" / "instances_train.json", spec)
    return _with_reasons({
        "layout": "coco",
        "names": ["cat", "dog", "box"],
        "splits": {"train": 15},
        "images_found": 15,
        "images_packed": 9,
        "images_skipped": {"unreadable": 1, "truncated": 2, "empty_file": 1, "path_outside_root": 1,
                           "missing_image": 1},
        "boxes_found": 4 + 2 + 2 + 2 + 1 + 1 + 1 + 1 + 2 + 1 + 1 + 1 + 1,  # 20: every annotation in the json
        "boxes_packed": 2 + 1 + 1 + 1 + 1 + 1,  # 7
        "boxes_dropped": {"duplicate": 1, "crowd": 1, "out_of_bounds": 1, "class_out_of_range": 1,
                          "zero_size": 1, "bad_line": 1, "image_skipped": 6, "orphan_annotation": 1},
        "fixes": {"clipped": 1},
        "warnings": {"size_mismatch": 2},
        "exif": {"source": "train/exif_rotated.jpg", "box": [ecx, ecy, ew, eh]},
        "passthrough": "train/good.jpg",
        "dotted": "train/my.photo v2 (1).jpg",
    })


def _write_coco_json(path: Path, spec: dict[str, tuple[tuple[int, int], list]]) -> None:
    """Write `spec` as COCO json, plus one orphan annotation (an image id no image has)."""
    images, anns = [], []
    for i, (name, ((w, h), boxes)) in enumerate(spec.items(), 1):
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for cid, bbox, crowd in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid, "bbox": bbox, "iscrowd": crowd,
                         "area": 1.0})
    anns.append({"id": len(anns) + 1, "image_id": 12345, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 0})
    cats = [{"id": 11, "name": "box"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]  # unsorted on purpose
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def tiny_jpeg(seed: int = 0) -> bytes:
    """A valid 64 x 48 JPEG (different bytes per seed)."""
    return _jpeg(_scene(48, 64, seed))


def snapshot(root: Path, out: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every entry under `root` except `out` and what is inside it
    (symlinks not followed). Equal before and after a build: nothing was written outside -o."""
    skip = os.fspath(out)
    snap: dict[str, tuple[int, int]] = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            if p == skip or p.startswith(skip + os.sep):
                continue
            st = os.lstat(p)
            snap[p] = (st.st_size, st.st_mtime_ns)
    return snap


def checked_report(out: Path) -> dict:
    """The report.json a build wrote in `out`, after checking that its totals reconcile."""
    report = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
    for t in (report["totals"], *report["splits"].values()):
        assert t["images"]["found"] == t["images"]["packed"] + sum(t["images"]["skipped"].values()), t
        assert t["boxes"]["found"] == t["boxes"]["packed"] + sum(t["boxes"]["dropped"].values()), t
    return report


def checked_build(src: Path, out: Path, **kw) -> dict:
    """The real build (one process), checked: report reconciles, nothing written outside `out`."""
    from packer.build import build_dataset

    before = snapshot(out.parent, out)
    build_dataset(src, out, fmt="wds", size=64, workers=1, **kw)
    assert snapshot(out.parent, out) == before
    return checked_report(out)


def cli_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the packer CLI in process: (exit code, stderr)."""
    from packer.cli import main as packer_main

    with pytest.raises(SystemExit) as e:
        packer_main(argv)
    return e.value.code, capsys.readouterr().err
