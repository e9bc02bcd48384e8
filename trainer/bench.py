"""Loader-only throughput, interleaved: ours vs ultralytics' YOLODataset vs raw JPEG decoding.

    python -m trainer.bench SHARDS [--split train] [--loader auto|dali|torch|all] [--imgsz 640]
        [--batch 16] [--workers N] [--augment] [--cache ram|disk] [--source RAW_FOLDER]
        [--rounds 5] [--json]

Every contender is built once (workers persist, as in training), runs one untimed warm-up epoch,
then whole epochs round by round in a rotated order, all in one process, so that a loaded shared
machine slows them alike; each round's figures become ratios to the decode ceiling of the same
round, and the medians over rounds are reported. Work a contender's processes keep doing after
its last batch (ultralytics' InfiniteDataLoader prepares its next epoch) is waited for and
counted as its own time. Contenders: our loader(s); ultralytics' `YOLODataset` +
`build_dataloader` on the raw source folder (YOLO layout, or COCO converted to a temporary YOLO
copy) when `--source` is given; plain `cv2.imdecode` of the packed JPEGs in as many processes as
workers (the ceiling for any loader that decodes on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packer.errors import PackerError
from trainer.data import AugmentConfig, make_loader
from trainer.data.common import SplitData, default_workers, open_split

IDLE_CPU_S = 0.01  # a contender is done when its processes use less CPU than this per poll


class BenchError(PackerError, ValueError):
    """Bad benchmark input."""


@dataclass
class Contender:
    """A named loader: `epoch(e)` runs one whole epoch and returns the number of images."""

    name: str
    epoch: Callable[[int], int]
    close: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)


def _child_cpu() -> float:
    import psutil

    total = 0.0
    for c in psutil.Process().children(recursive=True):
        try:
            t = c.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _run_one(c: Contender, e: int) -> tuple[float, int]:
    """Wall time of one epoch plus the tail of work its processes do after the last batch."""
    t0 = time.perf_counter()
    n = c.epoch(e)
    last = _child_cpu()
    while True:  # background work (next epoch's prefetch) is this contender's time
        time.sleep(0.05)
        now = _child_cpu()
        if now - last < IDLE_CPU_S:
            break
        last = now
    return time.perf_counter() - t0 - 0.05, n


def interleave(contenders: list[Contender], rounds: int, ref: str) -> dict[str, dict[str, float]]:
    """Warm-up epoch each, then `rounds` rounds in rotated order; medians of img/s and of
    same-round ratios to contender `ref`."""
    for c in contenders:
        _run_one(c, 0)
    for r in range(rounds):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            dt, n = _run_one(c, r + 1)
            c.times.append(dt)
            c.images.append(n)
    base = next(c for c in contenders if c.name == ref)
    out: dict[str, dict[str, float]] = {}
    for c in contenders:
        rates = [n / t for n, t in zip(c.images, c.times, strict=True)]
        refs = [n / t for n, t in zip(base.images, base.times, strict=True)]
        out[c.name] = {"img_per_s": statistics.median(rates),
                       "ratio": statistics.median(a / b for a, b in zip(rates, refs, strict=True)),
                       "rounds": rounds}
    return out


def ours(shards: str, split: str, loader: str, imgsz: int, batch: int, workers: int, augment: bool,
         cache: str | None = None, name: str | None = None, **kw: Any) -> Contender:
    """Our loader as a contender."""
    ld = make_loader(shards, split, loader=loader, imgsz=imgsz, batch=batch, train=True, workers=workers,
                     device="auto", augment=AugmentConfig() if augment else AugmentConfig.off(), cache=cache, **kw)

    def epoch(e: int) -> int:
        ld.set_epoch(e)
        return sum(int(b["img"].shape[0]) for b in ld)

    label = name or f"ours-{ld.kind}" + (f"-cache-{cache}" if cache else "")
    return Contender(label, epoch, ld.close)


# ----------------------------------------------------------------------------- baselines


_JPEGS: list[bytes] = []


def _decode_range(args: tuple[int, int]) -> int:
    import cv2
    import numpy as np

    a, b = args
    for j in _JPEGS[a:b]:
        cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
    return b - a


def decode_ceiling(data: SplitData, workers: int) -> Contender:
    """cv2.imdecode of the split's packed JPEGs (held in memory) on `workers` forked processes."""
    import multiprocessing as mp

    from trainer.data.records import RecordSource

    src = RecordSource(data)
    global _JPEGS
    _JPEGS = [src.jpeg_at(int(s), int(p)) for s, p in zip(data.labels.shard, data.labels.pos, strict=True)]
    procs = max(workers, 1)
    n = len(_JPEGS)
    chunks = [(i * n // procs, (i + 1) * n // procs) for i in range(procs)]
    pool = mp.get_context("fork").Pool(procs)

    def epoch(_e: int) -> int:
        return sum(pool.map(_decode_range, chunks))

    def close() -> None:
        pool.terminate()
        pool.join()

    return Contender("decode-ceiling", epoch, close)


def ultralytics_loader(source: Path, data: SplitData, imgsz: int, batch: int, workers: int, augment: bool,
                       cache: str | bool = False) -> Contender:
    """ultralytics' YOLODataset + build_dataloader on the raw folder (its default augmentation)."""
    import shutil
    import tempfile

    from trainer.offline import setup_offline

    setup_offline()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import DEFAULT_CFG

    tmp = tempfile.mkdtemp(prefix="bench-yolo-")
    split = "train" if data.name.startswith("train") else data.name
    img_dir, names = _yolo_images_dir(source, split, Path(tmp))
    names = names or list(data.manifest.names)
    hyp = get_cfg(DEFAULT_CFG, {"imgsz": imgsz})
    ds = YOLODataset(img_path=str(img_dir), imgsz=imgsz, batch_size=batch, augment=augment, hyp=hyp, rect=False,
                     cache=cache, single_cls=False, stride=32, pad=0.0, prefix="", task="detect", classes=None,
                     data={"names": dict(enumerate(names)), "nc": len(names), "channels": 3}, fraction=1.0)
    dl = build_dataloader(ds, batch, workers, shuffle=True, rank=-1, pin_memory=False, device="cpu")

    def epoch(e: int) -> int:
        if hasattr(dl, "sampler") and hasattr(dl.sampler, "set_epoch"):
            dl.sampler.set_epoch(e)
        return sum(int(b["img"].shape[0]) for b in dl)

    def close() -> None:
        it = getattr(dl, "iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        shutil.rmtree(tmp, ignore_errors=True)

    return Contender("ultralytics" + (f"-cache-{cache}" if cache else ""), epoch, close)


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


def run_bench(shards: str, *, split: str = "train", loader: str = "all", imgsz: int = 640, batch: int = 16,
              workers: int | None = None, augment: bool = False, source: str | None = None,
              cache: str | None = None, rounds: int = 3) -> dict[str, Any]:
    """Run every contender interleaved; returns the JSON-able result (ratios to the decode ceiling)."""
    data = open_split(shards, split)
    workers = default_workers() if workers is None else workers
    kinds = ["dali", "torch"] if loader == "all" else [loader]
    if data.fmt == "lmdb" and loader == "all":
        kinds = ["torch"]
    cs = [decode_ceiling(data, workers)]
    for k in kinds:
        cs.append(ours(shards, data.name, k, imgsz, batch, workers, augment, cache=cache))
    if source:
        cs.append(ultralytics_loader(Path(source), data, imgsz, batch, workers, augment))
        if cache:
            cs.append(ultralytics_loader(Path(source), data, imgsz, batch, workers, augment, cache="ram"))
    try:
        res = interleave(cs, rounds, ref="decode-ceiling")
    finally:
        for c in cs:
            c.close()
    return {"shards": str(shards), "split": data.name, "format": data.fmt, "num_samples": data.info.num_samples,
            "imgsz": imgsz, "batch": batch, "workers": workers, "augment": augment, "cache": cache,
            "cpus": _cpus(), "rounds": rounds, "contenders": res}


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def format_report(r: dict[str, Any]) -> str:
    aug = "training augmentation (mosaic, affine, HSV, flip)" if r["augment"] else "no augmentation (letterbox)"
    lines = [f"{r['shards']} [{r['format']}, split {r['split']}, {r['num_samples']} images] imgsz {r['imgsz']}, "
             f"batch {r['batch']}, {r['workers']} workers, {aug}, {r['cpus']} CPUs, medians of {r['rounds']} "
             "interleaved rounds"]
    res = r["contenders"]
    ultra = res.get("ultralytics")
    for name, v in res.items():
        extra = ""
        if ultra and name != "ultralytics":
            extra = f"  {v['ratio'] / ultra['ratio']:5.2f}x ultralytics"
        lines.append(f"  {name:<24} {v['img_per_s']:8.1f} img/s  {v['ratio']:5.2f} of the decode ceiling{extra}")
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
    ap.add_argument("--cache", choices=["ram", "disk"], default=None, help="our loader reads a decoded cache")
    ap.add_argument("--source", default=None, help="raw COCO or YOLO folder for the ultralytics comparison")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        r = run_bench(a.shards, split=a.split, loader=a.loader, imgsz=a.imgsz, batch=a.batch, workers=a.workers,
                      augment=a.augment, source=a.source, cache=a.cache, rounds=a.rounds)
    except ValueError as e:  # user errors: bad folder, split, sizes, a cache that does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=None, default=float) if a.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
