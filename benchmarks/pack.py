"""Packing throughput and memory, as ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/pack.py [--src ../shared/data/coco128] [--size 512] [--repeat 4]

Measures, on the same images:
- ceiling: one core doing only cv2.imdecode + cv2.resize(INTER_AREA) + cv2.imencode;
- `packer build --workers 1` and `--workers 2` (whole CLI runs, spawn start-up included);
- peak RSS of the whole process tree (main + workers), for the dataset and for a 4x bigger
  one (symlinked copies), to show memory does not grow with dataset size.
Prints a table and one JSON line (--json for the JSON only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

from packer.images import configure_worker

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_flat_copy(src_images: list[Path], dst: Path, repeat: int) -> Path:
    """A YOLO flat folder of `repeat` symlinked copies of the images (labels are not the cost)."""
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    (dst / "classes.txt").write_text("object\n")
    for r in range(repeat):
        for p in src_images:
            (dst / "images" / f"r{r}_{p.name}").symlink_to(p.resolve())
    return dst


def ceiling(images: list[Path], size: int, quality: int) -> float:
    """img/s of bare decode+resize+encode on one core (the per-core upper bound)."""
    configure_worker()  # what each packing worker runs with
    blobs = [np.frombuffer(p.read_bytes(), np.uint8) for p in images]
    t0 = time.perf_counter()
    for b in blobs:
        img = cv2.imdecode(b, cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        r = size / max(h, w)
        if r < 1:
            img = cv2.resize(img, (min(int(np.ceil(w * r)), size), min(int(np.ceil(h * r)), size)),
                             interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return len(blobs) / (time.perf_counter() - t0)


def run_build(src: Path, out: Path, workers: int, size: int, fmt: str) -> dict:
    """One `packer build` in a subprocess; returns its JSON summary plus peak tree RSS."""
    cmd = [str(BIN / "packer"), "build", str(src), "-o", str(out), "--format", fmt, "--size", str(size),
           "--workers", str(workers), "--json", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {stderr}")
    s = json.loads(stdout)
    return {"img_per_s": s["images"]["packed"] / wall, "wall_s": wall, "packed": s["images"]["packed"],
            "peak_rss_mb": peak[0] / 1e6, "output_mb": s["output_bytes"] / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    ap.add_argument("--size", type=int, default=512, help="below the source size, so every image is resized")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the images in the measured set")
    ap.add_argument("--format", default="tfrecord")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    images = sorted(p for p in (a.src / "train2017").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = make_flat_copy(images, tmp / "x1", 1)
        big = make_flat_copy(images, tmp / "xN", a.repeat)
        # best of several, before and after the builds: the ceiling must not be flattered by noise
        ceil = max(ceiling(images, a.size, a.quality) for _ in range(3))
        w1 = run_build(big, tmp / "o1", 1, a.size, a.format)
        w2 = run_build(big, tmp / "o2", 2, a.size, a.format)
        m_small = run_build(small, tmp / "o3", 2, a.size, a.format)
        ceil = max([ceil] + [ceiling(images, a.size, a.quality) for _ in range(2)])
    res = {
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "images": w1["packed"], "size": a.size, "format": a.format,
        "ceiling_img_per_s_1core": round(ceil, 1),
        "workers1_img_per_s": round(w1["img_per_s"], 1),
        "workers2_img_per_s": round(w2["img_per_s"], 1),
        "speedup_2_vs_1": round(w2["img_per_s"] / w1["img_per_s"], 2),
        "per_core_vs_ceiling_w1": round(w1["img_per_s"] / ceil, 2),
        "per_core_vs_ceiling_w2": round(w2["img_per_s"] / 2 / ceil, 2),
        "peak_rss_mb_w2": round(w2["peak_rss_mb"], 1),
        f"peak_rss_mb_w2_{len(images)}_images": round(m_small["peak_rss_mb"], 1),
        "output_mb": round(w2["output_mb"], 1),
    }
    if not a.json:
        print(f"packing {res['images']} images at --size {a.size} ({a.format}) on {res['machine']}")
        print(f"  ceiling (decode+resize+encode, 1 core) {ceil:8.1f} img/s")
        print(f"  packer --workers 1                     {w1['img_per_s']:8.1f} img/s  ({res['per_core_vs_ceiling_w1']:.2f}x ceiling)")
        print(f"  packer --workers 2                     {w2['img_per_s']:8.1f} img/s  ({res['speedup_2_vs_1']:.2f}x workers 1, "
              f"{res['per_core_vs_ceiling_w2']:.2f}x ceiling per core)")
        print(f"  peak RSS, whole tree, workers 2        {w2['peak_rss_mb']:8.1f} MB for {w2['packed']} images, "
              f"{m_small['peak_rss_mb']:.1f} MB for {m_small['packed']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
