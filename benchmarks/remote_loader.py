"""Loader throughput from a local HTTP server vs from local disk, in one run (not a test).

    .venv/bin/python benchmarks/remote_loader.py [--source /work/shared/data/coco128] [--size 320]
        [--batch 16] [--workers 2] [--epochs 3] [--augment] [--out out/bench-remote]

Packs ``--repeat`` copies of the COCO source as wds and tfrecord at ``--size`` (reused if already there), serves the
folder over HTTP on 127.0.0.1 (the test server: threaded, Range support), then measures:

- torch loader over wds: local shards vs streamed from HTTP (img/s per epoch after the first,
  persistent workers; no cache involved);
- DALI-CPU over tfrecord: local shards vs HTTP through the shard cache, cold (the loader's
  set-up downloads and verifies the shards: counted in the first epoch's time) and warm (a new
  loader on the filled cache: set-up re-hashes the cached copies; counted too).

Without ``--augment`` batches are letterboxed only, so the numbers show the data path (read +
decode) rather than augmentation, which dominates on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _epoch(loader) -> tuple[int, float]:  # noqa: ANN001
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += int(b["img"].shape[0])
    return n, time.perf_counter() - t


def _rate(loader, epochs: int, setup_s: float = 0.0) -> dict[str, float]:  # noqa: ANN001
    """img/s of the first epoch (set-up time included) and of the later ones (steady state)."""
    first_n, first_t = _epoch(loader)
    rest_n = rest_t = 0.0
    for e in range(1, epochs):
        loader.set_epoch(e)
        n, t = _epoch(loader)
        rest_n, rest_t = rest_n + n, rest_t + t
    return {"first_epoch_img_s": first_n / (first_t + setup_s),
            "steady_img_s": rest_n / rest_t if rest_t else first_n / first_t}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "coco128"))
    ap.add_argument("--repeat", type=int, default=8, help="copies of the source (8: coco128 -> 1024 images)")
    ap.add_argument("--size", type=int, default=640, help="packed size = network input size")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--augment", action="store_true", help="training augmentation (mosaic, affine, HSV)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-remote"))
    a = ap.parse_args()

    from packer.build import build_dataset
    from tests._servers import http_files
    from trainer.data import make_loader

    return _run(a, build_dataset, http_files, make_loader)


def _run(a, build_dataset, http_files, make_loader) -> int:  # noqa: ANN001
    from loader import replicate_coco

    out = Path(a.out)
    data = out / f"data-{a.size}-x{a.repeat}"
    src = replicate_coco(Path(a.source), out / f"coco-x{a.repeat}", a.repeat)
    for fmt in ("wds", "tfrecord"):
        if not (data / fmt / "manifest.json").is_file():
            build_dataset(src, data / fmt, fmt=fmt, size=a.size, shard_size=a.shard_size, overwrite=True)
    kw = dict(imgsz=a.size, batch=a.batch, train=a.augment, device="cpu", workers=a.workers)
    res: dict[str, dict[str, float]] = {}
    cache = Path(tempfile.mkdtemp(prefix="bench-remote-cache-"))
    try:
        with http_files(data) as base:
            for where, src in (("disk", data / "wds"), ("http", f"{base}/wds")):
                t = time.perf_counter()
                ld = make_loader(src, "train", loader="torch", cache_dir=cache, **kw)
                res[f"torch-wds {where}"] = _rate(ld, a.epochs, time.perf_counter() - t)
                ld.close()
            t = time.perf_counter()
            ld = make_loader(data / "tfrecord", "train", loader="dali", **kw)
            res["dali-cpu-tfrecord disk"] = _rate(ld, a.epochs, time.perf_counter() - t)
            for label in ("http cold cache", "http warm cache"):
                t = time.perf_counter()
                ld = make_loader(f"{base}/tfrecord", "train", loader="dali", cache_dir=cache, **kw)
                res[f"dali-cpu-tfrecord {label}"] = _rate(ld, a.epochs, time.perf_counter() - t)
                ld.close()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    mode = "train augmentation" if a.augment else "letterbox only"
    n = ld.num_samples
    print(f"{n} images (coco128 x{a.repeat}) packed at {a.size}px, batch {a.batch}, workers/threads {a.workers}, {mode}, CPU")
    print(f"{'loader / source':<36}{'1st epoch img/s':>16}{'steady img/s':>14}{'vs disk':>9}")
    for k, v in res.items():
        disk = res[k.split(" ")[0] + " disk"]
        ratio = v["steady_img_s"] / disk["steady_img_s"]
        v["steady_vs_disk"] = ratio
        v["first_vs_disk"] = v["first_epoch_img_s"] / disk["first_epoch_img_s"]
        print(f"{k:<36}{v['first_epoch_img_s']:>16.1f}{v['steady_img_s']:>14.1f}{ratio:>8.2f}x")
    out.mkdir(parents=True, exist_ok=True)
    (out / "remote_loader.json").write_text(json.dumps({"args": vars(a), "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
