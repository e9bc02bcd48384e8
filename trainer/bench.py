"""Loader-only throughput: ours vs ultralytics' YOLODataset vs raw JPEG decoding.

    python -m trainer.bench SHARDS [--split train] [--loader auto|dali|torch|all] [--imgsz 640]
        [--batch 16] [--workers N] [--augment] [--source RAW_FOLDER] [--json]

Prints images per second and data time per batch of each loader (nothing else runs: the
consumer only counts), and, in the same run, the same figures for ultralytics'
`YOLODataset` + `build_dataloader` on the raw source folder (YOLO layout, or COCO converted
to a temporary YOLO copy) and for plain OpenCV decoding of the packed JPEGs with the same
number of processes (the ceiling for any loader that decodes on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from trainer.data import AugmentConfig, make_loader
from trainer.data.common import open_split

MIN_IMAGES = 512  # timed images per measurement (whole epochs)


class BenchError(ValueError):
    """Bad benchmark input."""


def _time_epochs(iterate, epoch_len: int, batch: int) -> dict[str, float]:  # noqa: ANN001
    """Run one untimed warm-up epoch, then whole epochs until MIN_IMAGES; img/s and ms/batch."""
    t0 = time.perf_counter()
    n_warm = iterate(0)
    warm = time.perf_counter() - t0
    epochs = max(1, math.ceil(MIN_IMAGES / max(epoch_len * batch, 1)))
    images = batches = 0
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        got = iterate(e)
        images += got
        batches += math.ceil(got / batch)
    dt = time.perf_counter() - t0
    return {"img_per_s": images / dt, "ms_per_batch": 1000 * dt / max(batches, 1), "images": images,
            "first_epoch_s": warm, "first_epoch_images": n_warm}


def bench_ours(shards: str, split: str, loader: str, imgsz: int, batch: int, workers: int | None,
               augment: bool) -> dict[str, Any]:
    ld = make_loader(shards, split, loader=loader, imgsz=imgsz, batch=batch, train=True, workers=workers,
                     device="auto", augment=AugmentConfig() if augment else AugmentConfig.off())

    def iterate(epoch: int) -> int:
        ld.set_epoch(epoch)
        return sum(int(b["img"].shape[0]) for b in ld)

    try:
        res = _time_epochs(iterate, len(ld), batch)
    finally:
        ld.close()
    res["kind"] = ld.kind
    return res


# ----------------------------------------------------------------------------- ultralytics


def _yolo_images_dir(source: Path, split: str, tmp: Path) -> tuple[Path, list[str]]:
    """A YOLO-layout images folder for `source` (COCO json converted into `tmp`) and class names."""
    import yaml

    ann = source / "annotations"
    jsons = sorted(ann.glob("instances_*.json")) if ann.is_dir() else []
    if jsons:
        want = [j for j in jsons if j.stem.removeprefix("instances_").startswith(split)] or jsons[:1]
        coco = json.loads(want[0].read_text())
        cats = sorted(c["id"] for c in coco["categories"])
        names = [next(c["name"] for c in coco["categories"] if c["id"] == i) for i in cats]
        cat_index = {c: i for i, c in enumerate(cats)}
        sub = want[0].stem.removeprefix("instances_")
        img_dir, lab_dir = tmp / "images" / sub, tmp / "labels" / sub
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        boxes: dict[int, list[str]] = {}
        for a in coco["annotations"]:
            if a.get("iscrowd"):
                continue
            boxes.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            src = source / sub / im["file_name"]
            if not src.is_file():
                continue
            (img_dir / im["file_name"]).symlink_to(src.resolve())
            w, h = im["width"], im["height"]
            lines = []
            for a in boxes.get(im["id"], []):
                x, y, bw, bh = a["bbox"]
                x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
                if x2 - x1 > 0 and y2 - y1 > 0:
                    lines.append(f"{cat_index[a['category_id']]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                                 f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
            if lines:
                (lab_dir / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
        return img_dir, names
    yml = next(iter(sorted(source.glob("*.yaml"))), None)
    names: list[str] = []
    if yml is not None:
        cfg = yaml.safe_load(yml.read_text()) or {}
        n = cfg.get("names", [])
        names = [n[k] for k in sorted(n)] if isinstance(n, dict) else list(n)
    for cand in (source / "images" / split, source / "images", source):
        if cand.is_dir() and any(cand.iterdir()):
            return cand, names or [str(i) for i in range(80)]
    raise BenchError(f"{source}: no COCO annotations and no YOLO images folder found")


def bench_ultralytics(source: Path, split: str, imgsz: int, batch: int, workers: int, augment: bool,
                      names_hint: list[str]) -> dict[str, Any]:
    from trainer.offline import setup_offline

    setup_offline()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import DEFAULT_CFG

    with tempfile.TemporaryDirectory(prefix="bench-yolo-") as tmp:
        img_dir, names = _yolo_images_dir(source, split, Path(tmp))
        names = names or names_hint
        hyp = get_cfg(DEFAULT_CFG, {"imgsz": imgsz})  # ultralytics' default augmentation (mosaic 1.0, ...)
        ds = YOLODataset(img_path=str(img_dir), imgsz=imgsz, batch_size=batch, augment=augment, hyp=hyp, rect=False,
                         cache=False, single_cls=False, stride=32, pad=0.0, prefix="", task="detect", classes=None,
                         data={"names": dict(enumerate(names)), "nc": len(names), "channels": 3}, fraction=1.0)
        dl = build_dataloader(ds, batch, workers, shuffle=True, rank=-1, pin_memory=False, device="cpu")

        def iterate(epoch: int) -> int:
            if hasattr(dl, "sampler") and hasattr(dl.sampler, "set_epoch"):
                dl.sampler.set_epoch(epoch)
            return sum(int(b["img"].shape[0]) for b in dl)

        res = _time_epochs(iterate, len(dl), batch)
        res["images_in_source"] = len(ds)
    return res


# ----------------------------------------------------------------------------- decode ceiling


_JPEGS: list[bytes] = []


def _decode_range(args: tuple[int, int, int]) -> int:
    a, b, rounds = args
    for _ in range(rounds):
        for j in _JPEGS[a:b]:
            cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
    return (b - a) * rounds


def bench_decode(shards: str, split: str, workers: int) -> dict[str, Any]:
    """cv2.imdecode of the split's packed JPEGs (in memory) on `workers` processes (0 = this one)."""
    from trainer.data.torch_loader import RecordSource

    data = open_split(shards, split)
    src = RecordSource(data)
    jpegs = [src.read(int(s), int(p)).jpeg for s, p in zip(data.labels.shard, data.labels.pos, strict=True)]
    global _JPEGS
    _JPEGS = jpegs
    rounds = max(1, math.ceil(MIN_IMAGES / len(jpegs)))
    procs = max(workers, 1)
    chunks = [(i * len(jpegs) // procs, (i + 1) * len(jpegs) // procs, rounds) for i in range(procs)]
    if workers == 0:
        _decode_range((0, min(len(jpegs), 16), 1))  # warm-up
        t0 = time.perf_counter()
        n = _decode_range(chunks[0])
        dt = time.perf_counter() - t0
    else:
        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_decode_range, [(a, min(b, a + 4), 1) for a, b, _ in chunks])  # warm-up
            t0 = time.perf_counter()
            n = sum(pool.map(_decode_range, chunks))
            dt = time.perf_counter() - t0
    return {"img_per_s": n / dt, "images": n, "processes": procs,
            "mean_jpeg_kb": float(np.mean([len(j) for j in jpegs]) / 1024)}


# ----------------------------------------------------------------------------- entry point


def run_bench(shards: str, *, split: str = "train", loader: str = "all", imgsz: int = 640, batch: int = 16,
              workers: int | None = None, augment: bool = False, source: str | None = None) -> dict[str, Any]:
    """Run every measurement; returns the JSON-able result (``img_per_s`` = our fastest loader)."""
    data = open_split(shards, split)
    workers = (os.cpu_count() or 1) if workers is None else workers
    kinds = ["dali", "torch"] if loader == "all" else [loader]
    if data.fmt == "lmdb" and loader == "all":
        kinds = ["torch"]
    out: dict[str, Any] = {
        "shards": str(shards), "split": data.name, "format": data.fmt, "num_samples": data.info.num_samples,
        "imgsz": imgsz, "batch": batch, "workers": workers, "augment": augment, "cpus": os.cpu_count(),
        "loaders": {},
    }
    for k in kinds:
        r = bench_ours(shards, data.name, k, imgsz, batch, workers, augment)
        out["loaders"][r["kind"]] = r
    best_kind = max(out["loaders"], key=lambda k: out["loaders"][k]["img_per_s"])
    out["best"] = best_kind
    out["img_per_s"] = out["loaders"][best_kind]["img_per_s"]
    out["decode"] = bench_decode(shards, data.name, workers)
    out["ratio_to_decode"] = out["img_per_s"] / out["decode"]["img_per_s"]
    if source:
        src_split = split if split in ("train", "val") else data.name
        out["ultralytics"] = bench_ultralytics(Path(source), src_split, imgsz, batch, workers, augment,
                                               list(data.manifest.names))
        out["ratio_to_ultralytics"] = out["img_per_s"] / out["ultralytics"]["img_per_s"]
    return out


def format_report(r: dict[str, Any]) -> str:
    aug = "training augmentation (mosaic, affine, HSV, flip)" if r["augment"] else "no augmentation (letterbox)"
    lines = [f"{r['shards']} [{r['format']}, split {r['split']}, {r['num_samples']} images] imgsz {r['imgsz']}, "
             f"batch {r['batch']}, {r['workers']} workers, {aug}, {r['cpus']} CPUs"]
    for k, v in r["loaders"].items():
        lines.append(f"  ours {k:<10} {v['img_per_s']:8.1f} img/s  {v['ms_per_batch']:7.1f} ms/batch  "
                     f"(first epoch {v['first_epoch_s']:.1f} s)")
    if "ultralytics" in r:
        u = r["ultralytics"]
        lines.append(f"  ultralytics     {u['img_per_s']:8.1f} img/s  {u['ms_per_batch']:7.1f} ms/batch  "
                     f"(YOLODataset + build_dataloader on the raw folder)")
    d = r["decode"]
    lines.append(f"  decode ceiling  {d['img_per_s']:8.1f} img/s  (cv2.imdecode only, {d['processes']} process(es), "
                 f"{d['mean_jpeg_kb']:.0f} KB/JPEG)")
    lines.append(f"  best ({r['best']}): {r['ratio_to_decode']:.0%} of the decode ceiling"
                 + (f", {r['ratio_to_ultralytics']:.2f}x ultralytics" if "ratio_to_ultralytics" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.splitlines()[0])
    ap.add_argument("shards", help="packed dataset folder (with manifest.json)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--loader", default="all", choices=["all", "auto", "dali", "torch"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers / DALI threads (default: CPUs)")
    ap.add_argument("--augment", action="store_true", help="training augmentation on both sides (mosaic included)")
    ap.add_argument("--source", default=None, help="raw COCO or YOLO folder for the ultralytics comparison")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        r = run_bench(a.shards, split=a.split, loader=a.loader, imgsz=a.imgsz, batch=a.batch, workers=a.workers,
                      augment=a.augment, source=a.source)
    except ValueError as e:  # user errors: bad folder, split, sizes
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=None, default=float) if a.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
