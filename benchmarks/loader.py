"""Loader benchmark on coco128: our loaders vs ultralytics vs the decode ceiling, interleaved.

    .venv/bin/python benchmarks/loader.py [--source ../shared/data/coco128] [--repeat 1 8]
        [--format wds] [--imgsz 640] [--batch 16] [--workers 2] [--loaders torch] [--cache]
        [--hires] [--rounds 5] [--out out/bench] [--json]

For each `--repeat K` it packs K copies of the COCO source (symlinks; K=1: coco128 itself) at
``--size imgsz`` and runs `trainer.bench` (all contenders in one process, epoch by epoch, order
rotated every round, medians of same-round ratios) without and with training augmentation.
K > 1 matters for the augmented comparison: ultralytics keeps up to min(N, 8 x batch, 1000)
decoded images per worker for mosaic, which holds all of coco128 after the first epoch; with 8
copies (1,024 images) both sides decode every image of every epoch. `--cache` adds our loader on
the decoded RAM cache and ultralytics' ``cache='ram'``; `--hires` adds a copy of coco128 upscaled
to a 3000-px long side (JPEG q92), packed at imgsz, against ultralytics on the raw 3000-px folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _coco_splits(src: Path, dst: Path):  # noqa: ANN202 - a generator of (json path, split, parsed json)
    """Each `annotations/instances_<split>.json` of `src`, with `dst/<split>/` made for its images."""
    for ann in sorted((src / "annotations").glob("instances_*.json")):
        sub = ann.stem.removeprefix("instances_")
        (dst / sub).mkdir(parents=True, exist_ok=True)
        yield ann, sub, json.loads(ann.read_text())


def replicate_coco(src: Path, dst: Path, k: int) -> Path:
    """A COCO folder with `k` copies of every image of `src` (symlinks) and of its annotations."""
    if k == 1:
        return src
    if (dst / "annotations").is_dir():
        return dst
    for ann, sub, coco in _coco_splits(src, dst):
        images, anns, next_ann = [], [], 1
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for c in range(k):
            for im in coco["images"]:
                name = f"r{c}_{im['file_name']}"
                if (src / sub / im["file_name"]).is_file():
                    (dst / sub / name).symlink_to((src / sub / im["file_name"]).resolve())
                new_id = c * 10**9 + im["id"]
                images.append({**im, "id": new_id, "file_name": name})
                for a in by_image.get(im["id"], []):
                    anns.append({**a, "id": next_ann, "image_id": new_id})
                    next_ann += 1
        (dst / "annotations").mkdir(exist_ok=True)
        (dst / "annotations" / ann.name).write_text(json.dumps({**coco, "images": images, "annotations": anns}))
    return dst


def upscale_coco(src: Path, dst: Path, long_side: int = 3000) -> Path:
    """A copy of `src` with every image upscaled to `long_side` px (JPEG q92); boxes scaled with them."""
    import cv2

    if (dst / "annotations").is_dir():
        return dst
    for ann, sub, coco in _coco_splits(src, dst):
        gain: dict[int, float] = {}
        for im in coco["images"]:
            img = cv2.imread(str(src / sub / im["file_name"]), cv2.IMREAD_COLOR)
            if img is None:
                continue
            g = long_side / max(img.shape[:2])
            big = cv2.resize(img, (round(img.shape[1] * g), round(img.shape[0] * g)), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(dst / sub / im["file_name"]), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
            gain[im["id"]] = g
            im["height"], im["width"] = big.shape[:2]
        for a in coco["annotations"]:
            g = gain.get(a["image_id"], 1.0)
            a["bbox"] = [v * g for v in a["bbox"]]
            a["area"] = a.get("area", 0) * g * g
        (dst / "annotations").mkdir(parents=True, exist_ok=True)
        (dst / "annotations" / ann.name).write_text(json.dumps(coco))
    return dst


def _pack(src: Path, shards: Path, fmt: str, imgsz: int, workers: int) -> Path:
    from packer.build import build_dataset

    if not (shards / "manifest.json").is_file():
        build_dataset(src, shards, fmt=fmt, size=imgsz, overwrite=True, workers=workers, progress=False,
                      follow_symlinks=True)  # the copies are symlinks to the source
    return shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "coco128"))
    ap.add_argument("--repeat", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--format", default="wds", choices=["tfrecord", "wds", "lmdb"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loaders", default="torch", choices=["torch", "dali", "all"])
    ap.add_argument("--cache", action="store_true", help="also our RAM cache vs ultralytics cache='ram'")
    ap.add_argument("--hires", action="store_true", help="also coco128 upscaled to 3000 px, packed at imgsz")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--json", action="store_true", help="also print every result as JSON lines")
    a = ap.parse_args()

    from trainer.bench import format_report, run_bench

    out = Path(a.out)
    cases = []
    for k in a.repeat:
        src = replicate_coco(Path(a.source), out / f"coco128x{k}", k)
        cases.append((f"x{k}", src, _pack(src, out / f"shards-x{k}-{a.format}-{a.imgsz}", a.format, a.imgsz, a.workers)))
    if a.hires:
        src = upscale_coco(Path(a.source), out / "coco128-3000")
        cases.append(("3000px", src, _pack(src, out / f"shards-3000-{a.format}-{a.imgsz}", a.format, a.imgsz,
                                            a.workers)))
    rows = []
    for name, src, shards in cases:
        for augment in (False, True):
            r = run_bench(str(shards), loader=a.loaders, imgsz=a.imgsz, batch=a.batch, workers=a.workers,
                          augment=augment, source=str(src), cache="ram" if a.cache else None, rounds=a.rounds)
            print(format_report(r), flush=True)
            if a.json:
                print(json.dumps(r, default=float))
            rows.append((name, r))
    print("\nsummary (medians of same-round ratios, one interleaved run per row)")
    print(f"{'data':>7} {'aug':>4} {'contender':<24} {'img/s':>8} {'of ceiling':>11} {'x ultralytics':>14}")
    for name, r in rows:
        res = r["contenders"]
        u = res.get("ultralytics", {}).get("ratio")
        for c, v in res.items():
            x = f"{v['ratio'] / u:13.2f}x" if u else ""
            print(f"{name:>7} {'yes' if r['augment'] else 'no':>4} {c:<24} {v['img_per_s']:>8.1f} "
                  f"{v['ratio']:>11.2f} {x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
