"""It learns: our trainer vs ultralytics' own trainer on the same small synthetic detection set.

1. Generate coloured shapes (circle / square / triangle = 3 classes) on textured backgrounds, YOLO layout.
2. Pack it with ``packer.build.build_dataset``.
3. Train a nano model on CPU with ``trainer.engine.train`` (the ``python -m trainer.run`` job).
4. Train ``YOLO("yolov8n.yaml").train(...)`` on the same raw images, same model/epochs/imgsz/batch.
5. Validate both best.pt files the same way, ``YOLO(best).val(data=..., rect=False)`` on the raw val images,
   and print both mAP50-95 and the ratio (target >= 0.9).

Usage: ``.venv/bin/python benchmarks/learn.py [--epochs 30 --imgsz 160 --batch 16 --train 240 --val 60]``.
Writes ``out/learn/learn.json`` with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.offline import setup_offline  # noqa: E402

setup_offline()

NAMES = ["circle", "square", "triangle"]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Texture: low-frequency colour noise + stripes or a checkerboard + pixel noise."""
    small = rng.uniform(40, 200, (max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 24)
    if rng.random() < 0.5:
        ang = rng.uniform(0, math.pi)
        pattern = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period)
    else:
        pattern = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    img += pattern[..., None] * rng.uniform(8, 30)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(img: np.ndarray, cls: int, x0: int, y0: int, s: int, color: tuple[int, ...]) -> tuple[float, ...]:
    """Draw one shape in the s x s box at (x0, y0); return its tight box (x1, y1, x2, y2)."""
    if cls == 0:
        cv2.circle(img, (x0 + s // 2, y0 + s // 2), s // 2, color, -1, lineType=cv2.LINE_AA)
        return x0, y0, x0 + 2 * (s // 2), y0 + 2 * (s // 2)
    if cls == 1:
        cv2.rectangle(img, (x0, y0), (x0 + s - 1, y0 + s - 1), color, -1)
        return x0, y0, x0 + s, y0 + s
    pts = np.array([[x0 + s // 2, y0], [x0, y0 + s - 1], [x0 + s - 1, y0 + s - 1]], np.int32)
    cv2.fillPoly(img, [pts], color, lineType=cv2.LINE_AA)
    return x0, y0, x0 + s, y0 + s


def make_shapes(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """The synthetic set in YOLO layout with data.yaml; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(200, 321)), int(rng.integers(200, 321))
            img = _background(rng, h, w)
            boxes: list[tuple[float, ...]] = []
            lines = []
            for _ in range(int(rng.integers(1, 5))):
                s = int(rng.integers(min(h, w) // 8, min(h, w) // 3))
                for _try in range(20):  # avoid heavy overlap so labels stay honest
                    x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
                    if all(x0 + s < b[0] or b[2] < x0 or y0 + s < b[1] or b[3] < y0 for b in boxes):
                        break
                else:
                    continue
                c = int(rng.integers(0, 3))
                color = tuple(int(v) for v in rng.integers(0, 256, 3))
                x1, y1, x2, y2 = _draw(img, c, x0, y0, s, color)
                boxes.append((x1, y1, x2, y2))
                lines.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{split}{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            (root / "labels" / split / f"{split}{i:04d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    (root / "data.yaml").write_text(
        f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    return root


def val_on_raw(weights: Path, data: Path, imgsz: int, batch: int) -> dict[str, float]:
    """The common yardstick: ultralytics' val on the raw val images, square letterbox (rect=False)."""
    from ultralytics import YOLO

    r = YOLO(str(weights)).val(data=str(data), imgsz=imgsz, batch=batch, rect=False, plots=False, verbose=False,
                               device="cpu", workers=0, project=str(weights.parent.parent), name="val",
                               exist_ok=True)
    return {k: round(float(v), 5) for k, v in r.results_dict.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "learn"))
    ap.add_argument("--train", type=int, default=240, help="training images")
    ap.add_argument("--val", type=int, default=60, help="validation images")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--loader", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ultralytics", action="store_true")
    a = ap.parse_args()

    import torch

    from packer.build import build_dataset
    from trainer.engine import TrainConfig, train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_shapes(out / "shapes", a.train, a.val, a.seed)
    t0 = time.time()
    build_dataset(data, out / "shards", fmt="tfrecord", size=max(a.imgsz, 160), overwrite=True)
    t_pack = time.time() - t0
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
                 "args": vars(a), "pack_s": round(t_pack, 1)}
    print(f"data: {a.train} train / {a.val} val images, 3 classes; packed in {t_pack:.1f} s")

    t0 = time.time()
    ours = train(TrainConfig(shards=str(out / "shards"), model=a.model, epochs=a.epochs, imgsz=a.imgsz,
                             batch=a.batch, device="cpu", loader=a.loader, seed=a.seed, out=str(out / "ours"),
                             exist_ok=True))
    res["ours_train_s"] = round(time.time() - t0, 1)
    res["ours_in_training"] = {k: round(v, 5) for k, v in ours.metrics.items()}
    res["ours_best_val"] = val_on_raw(ours.best or ours.last, data / "data.yaml", a.imgsz, a.batch)

    if not a.skip_ultralytics:
        from ultralytics import YOLO

        t0 = time.time()
        YOLO(a.model).train(data=str(data / "data.yaml"), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, device="cpu",
                            workers=0, project=str(out), name="ultralytics", exist_ok=True, plots=False, amp=False,
                            seed=a.seed, verbose=False)
        res["ultra_train_s"] = round(time.time() - t0, 1)
        best = out / "ultralytics" / "weights" / "best.pt"
        res["ultra_best_val"] = val_on_raw(best, data / "data.yaml", a.imgsz, a.batch)
        o, u = res["ours_best_val"]["metrics/mAP50-95(B)"], res["ultra_best_val"]["metrics/mAP50-95(B)"]
        res["ratio_map50_95"] = round(o / u, 3) if u > 0 else None

    (out / "learn.json").write_text(json.dumps(res, indent=2) + "\n")
    print("\n=== learn benchmark ===")
    print(f"machine: {res['machine']}")
    print(f"model {a.model}, {a.epochs} epochs, imgsz {a.imgsz}, batch {a.batch}")
    o = res["ours_best_val"]
    print(f"ours        : mAP50 {o['metrics/mAP50(B)']:.4f}  mAP50-95 {o['metrics/mAP50-95(B)']:.4f}  "
          f"(train {res['ours_train_s']:.0f} s)")
    if "ultra_best_val" in res:
        u = res["ultra_best_val"]
        print(f"ultralytics : mAP50 {u['metrics/mAP50(B)']:.4f}  mAP50-95 {u['metrics/mAP50-95(B)']:.4f}  "
              f"(train {res['ultra_train_s']:.0f} s)")
        ratio = res["ratio_map50_95"]
        print(f"ratio ours/ultralytics mAP50-95: {ratio}  (target >= 0.9: {'met' if ratio and ratio >= 0.9 else 'NOT met'})")
    print(f"figures in {out / 'learn.json'}")


if __name__ == "__main__":
    main()
