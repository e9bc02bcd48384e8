"""Loader benchmark on coco128: our loaders vs ultralytics vs raw decode, with ratios and targets.

    .venv/bin/python benchmarks/loader.py [--source /work/shared/data/coco128] [--repeat 1 8]
        [--format wds] [--imgsz 640] [--batch 16] [--workers 2] [--loaders torch dali] [--out out/bench]

For each `--repeat K` it packs K copies of the COCO source (K=1: coco128 itself) at
``--size imgsz`` and runs `trainer.bench` with and without training augmentation. K > 1
matters for the augmented comparison: ultralytics keeps up to min(N, 8 x batch, 1000) decoded
images per worker for mosaic, which holds all of coco128 after the first epoch (so it stops
decoding); with 8 copies (1024 images) both sides decode every image of every epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"no_aug_vs_ultralytics": 3.0, "aug_vs_ultralytics": 2.0, "vs_decode": 0.60}


def replicate_coco(src: Path, dst: Path, k: int) -> Path:
    """A COCO folder with `k` copies of every image of `src` (symlinks) and of its annotations."""
    if k == 1:
        return src
    if (dst / "annotations").is_dir():
        return dst
    for ann in sorted((src / "annotations").glob("instances_*.json")):
        sub = ann.stem.removeprefix("instances_")
        coco = json.loads(ann.read_text())
        (dst / sub).mkdir(parents=True, exist_ok=True)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "coco128"))
    ap.add_argument("--repeat", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--format", default="wds", choices=["tfrecord", "wds", "lmdb"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loaders", nargs="+", default=["torch"], choices=["torch", "dali"])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--json", action="store_true", help="also print every result as JSON lines")
    a = ap.parse_args()

    from packer.build import build_dataset
    from trainer.bench import format_report, run_bench

    out = Path(a.out)
    rows = []
    for k in a.repeat:
        src = replicate_coco(Path(a.source), out / f"coco128x{k}", k)
        shards = out / f"shards-x{k}-{a.format}-{a.imgsz}"
        if not (shards / "manifest.json").is_file():
            build_dataset(src, shards, fmt=a.format, size=a.imgsz, overwrite=True, workers=a.workers)
        for augment in (False, True):
            res = {}
            for loader in a.loaders:
                r = run_bench(str(shards), loader=loader, imgsz=a.imgsz, batch=a.batch, workers=a.workers,
                              augment=augment, source=str(src) if loader == a.loaders[0] else None)
                if res:
                    res["loaders"].update(r["loaders"])
                else:
                    res = r
            best = max(res["loaders"], key=lambda n: res["loaders"][n]["img_per_s"])
            res["best"], res["img_per_s"] = best, res["loaders"][best]["img_per_s"]
            res["ratio_to_decode"] = res["img_per_s"] / res["decode"]["img_per_s"]
            res["ratio_to_ultralytics"] = res["img_per_s"] / res["ultralytics"]["img_per_s"]
            print(format_report(res), flush=True)
            if a.json:
                print(json.dumps(res, default=float))
            rows.append((k, res))
    print("\nsummary (ratios measured within one run each)")
    print(f"{'images':>7} {'aug':>4} {'ours img/s':>11} {'ultra img/s':>12} {'decode img/s':>13} "
          f"{'x ultra':>8} {'of decode':>10}")
    for _k, r in rows:
        t = TARGETS["aug_vs_ultralytics" if r["augment"] else "no_aug_vs_ultralytics"]
        print(f"{r['num_samples']:>7} {'yes' if r['augment'] else 'no':>4} {r['img_per_s']:>11.1f} "
              f"{r['ultralytics']['img_per_s']:>12.1f} {r['decode']['img_per_s']:>13.1f} "
              f"{r['ratio_to_ultralytics']:>7.2f}x {r['ratio_to_decode']:>9.0%}   (targets {t:.0f}x, "
              f"{TARGETS['vs_decode']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
