"""Test data for the loader tests: synthetic images with solid rectangles, packed for real.

Shards are written with packer's own writers and described by a real Manifest and
LabelArrays (packer.format), so the loaders read exactly what the packer produces.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from packer.format import (
    FORMATS,
    LABELS_NAME,
    LabelArrays,
    Manifest,
    Record,
    ShardInfo,
    SplitInfo,
    make_key,
    shard_name,
    write_manifest,
)
from packer.writers import get_writer

# Saturated, well separated colours (RGB); class c is drawn in PALETTE[c].
PALETTE = np.array(
    [
        [230, 25, 25], [25, 200, 25], [25, 25, 230], [230, 230, 25], [230, 25, 230], [25, 230, 230],
        [255, 140, 0], [140, 0, 255], [0, 140, 255], [255, 255, 255],
    ],
    dtype=np.uint8,
)
BACKGROUND = (40, 40, 40)
SIZES = [(150, 200), (180, 120), (160, 160), (90, 210), (200, 150), (130, 170), (120, 120), (170, 100)]


def synth_image(i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB image i with 1-3 non-overlapping solid rectangles: (img, cls (n,), boxes (n,4) norm cx,cy,w,h)."""
    h, w = SIZES[i % len(SIZES)]
    img = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
    n = 1 + i % 3
    classes = rng.choice(len(PALETTE), size=n, replace=False)
    cls, boxes = [], []
    # one rectangle per vertical band so they never overlap
    for k, c in enumerate(classes):
        x0b, x1b = k * w // n, (k + 1) * w // n
        bw = int(rng.integers(max(16, (x1b - x0b) // 2), x1b - x0b - 4 + 1))
        bh = int(rng.integers(h // 4, h - 8))
        x0 = int(rng.integers(x0b + 2, x1b - bw - 2 + 1))
        y0 = int(rng.integers(4, h - bh - 4 + 1))
        img[y0 : y0 + bh, x0 : x0 + bw] = PALETTE[c]
        cls.append(int(c))
        boxes.append(((x0 + bw / 2) / w, (y0 + bh / 2) / h, bw / w, bh / h))
    return img, np.array(cls, np.int32), np.array(boxes, np.float32)


def make_records(n: int, split: str = "train", seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        img, cls, boxes = synth_image(i, rng)
        ok, jpg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 97])
        assert ok
        src = f"images/{split}/img{i:04d}.jpg"
        h, w = img.shape[:2]
        # original size: pretend the stored image was resized from an image 2.5x larger
        recs.append(Record(make_key(src), src, jpg.tobytes(), h, w, int(h * 2.5), int(w * 2.5), cls, boxes))
    return recs


def pack(root: Path, fmt: str, splits: dict[str, list[Record]], shard_sizes: dict[str, list[int]] | None = None) -> Path:
    """Write `splits` into `root` in format `fmt` (shard sizes per split, lmdb: one shard)."""
    assert fmt in FORMATS
    infos = {}
    for split, recs in splits.items():
        sizes = (shard_sizes or {}).get(split) or [len(recs)]
        if fmt == "lmdb":
            sizes = [len(recs)]
        assert sum(sizes) == len(recs)
        rows, shards, start = [], [], 0
        for si, n in enumerate(sizes):
            rel = f"{split}/{shard_name(split, si, fmt)}"
            w = get_writer(fmt, root / rel)
            for pos, rec in enumerate(recs[start : start + n]):
                w.add(rec)
                rows.append((rec, si, start + pos if fmt == "lmdb" else pos))
            done = w.close()
            idx = None if done.index is None else str(Path(done.index).relative_to(root))
            shards.append(ShardInfo(rel, done.num_samples, done.bytes, done.sha256, idx))
            start += n
        labels_rel = f"{split}/{LABELS_NAME}"
        LabelArrays.from_records(rows).save(root / labels_rel)
        counts = [0] * len(PALETTE)
        for r in recs:
            for c in r.cls:
                counts[c] += 1
        infos[split] = SplitInfo(len(recs), sum(counts), counts, labels_rel, shards)
    names = [f"c{i}" for i in range(len(PALETTE))]
    m = Manifest(fmt, 200, names, {"path": "synthetic", "layout": "yolo-dirs"}, {}, "test", infos)
    write_manifest(root, m)
    return root


def rect_match(img_rgb: np.ndarray, box_xyxy: np.ndarray, cls: int, tol: int = 60) -> tuple[float, float]:
    """(IoU, largest edge distance in px) between a box and the bounding box of the connected
    patch of its class colour that it covers most."""
    h, w = img_rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    # look only near the box: another copy of the same colour elsewhere (mosaic) must not count
    wx1, wy1 = max(int(np.floor(x1)) - 3, 0), max(int(np.floor(y1)) - 3, 0)
    wx2, wy2 = min(int(np.ceil(x2)) + 3, w), min(int(np.ceil(y2)) + 3, h)
    win = img_rgb[wy1:wy2, wx1:wx2].astype(np.int16)
    mask = (np.abs(win - PALETTE[cls].astype(np.int16)).max(-1) < tol).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    bx1, by1, bx2, by2 = x1 - wx1, y1 - wy1, x2 - wx1, y2 - wy1
    inside = lab[max(int(by1), 0) : int(np.ceil(by2)), max(int(bx1), 0) : int(np.ceil(bx2))]
    ids, counts = np.unique(inside[inside > 0], return_counts=True)
    if len(ids) == 0:
        return 0.0, float("inf")
    cx, cy, cw, ch, _ = stats[ids[np.argmax(counts)]]
    inter = max(0.0, min(bx2, cx + cw) - max(bx1, cx)) * max(0.0, min(by2, cy + ch) - max(by1, cy))
    union = (bx2 - bx1) * (by2 - by1) + cw * ch - inter
    edge = max(abs(cx - bx1), abs(cy - by1), abs(cx + cw - bx2), abs(cy + ch - by2))
    return float(inter / union), float(edge)
