"""Rebuild samples/ from ../shared/data/coco128 (run from the repository root):

    .venv/bin/python samples/make_samples.py [COCO128_DIR]

16 images picked for class variety and small size (one grayscale JPEG, one image with a
crowd annotation, one background image), split 12 train / 4 val, written twice: as COCO
(annotations/instances_{train,val}2017.json + {train,val}2017/) and as YOLO (data.yaml +
images/ + labels/, labels made by packer's own COCO converter).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packer.images import decode  # noqa: E402
from packer.labels import coco_to_yolo, format_yolo  # noqa: E402
from packer.sources.coco import category_names  # noqa: E402

FILES = [
    "000000000086.jpg", "000000000142.jpg", "000000000143.jpg", "000000000250.jpg",
    "000000000260.jpg", "000000000294.jpg", "000000000326.jpg", "000000000338.jpg",
    "000000000359.jpg", "000000000443.jpg", "000000000472.jpg", "000000000531.jpg",
    "000000000536.jpg", "000000000560.jpg", "000000000562.jpg", "000000000643.jpg",
]  # fmt: skip
VAL = set(FILES[3::4])  # 4 of 16


def main(src: Path) -> None:
    data = json.loads((src / "annotations" / "instances_train2017.json").read_text())
    ids, names = category_names(data, src)
    index = {cid: i for i, cid in enumerate(ids)}
    images = {im["file_name"]: im for im in data["images"]}
    out = ROOT / "samples"
    for d in ("coco", "yolo"):
        shutil.rmtree(out / d, ignore_errors=True)
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        files = [f for f in FILES if (f in VAL) == (split == "val")]
        ims = [images[f] for f in files]
        keep = {im["id"] for im in ims}
        anns = [a for a in data["annotations"] if a["image_id"] in keep]
        sub = {k: data[k] for k in ("info", "licenses") if k in data}
        sub.update(images=ims, annotations=anns, categories=data["categories"])
        ann_dir = out / "coco" / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"instances_{coco_split}.json").write_text(json.dumps(sub, separators=(",", ":")) + "\n")
        for d in (out / "coco" / coco_split, out / "yolo" / "images" / split, out / "yolo" / "labels" / split):
            d.mkdir(parents=True, exist_ok=True)
        for im in ims:
            f = im["file_name"]
            shutil.copyfile(src / "train2017" / f, out / "coco" / coco_split / f)
            shutil.copyfile(src / "train2017" / f, out / "yolo" / "images" / split / f)
            boxes = [
                (index[a["category_id"]], *a["bbox"], int(a.get("iscrowd", 0)))
                for a in anns if a["image_id"] == im["id"]
            ]
            if boxes:  # like ultralytics' convert_coco: no annotations -> no label file
                h, w = decode((src / "train2017" / f).read_bytes()).shape[:2]
                lab = coco_to_yolo(boxes, h, w, f, len(names))
                (out / "yolo" / "labels" / split / f).with_suffix(".txt").write_text(format_yolo(lab.cls, lab.boxes))
    y = {"path": ".", "train": "images/train", "val": "images/val", "names": names}
    (out / "yolo" / "data.yaml").write_text(yaml.safe_dump(y, sort_keys=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "coco128")
