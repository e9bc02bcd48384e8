"""The decode path: training decodes exactly as OpenCV unless the fast DCT is asked for, whose pixels
stay within tolerance; DCT-domain reduced decoding keeps the geometry; a JPEG with corrupt entropy
data (which OpenCV decodes silently) is counted and substituted."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _data_util import make_records, pack, rect_match

from packer.writers import open_reader
from trainer.data import AugmentConfig, make_loader
from trainer.data.decode import (
    FAST_IMAGE_TOL,
    FAST_MEAN_TOL,
    CorruptImage,
    decode_rgb,
    letterbox_image,
    reduce_target,
)
from trainer.data.transforms import letterbox_geometry


def _photos(coco128: Path, n: int = 12) -> list[bytes]:
    return [p.read_bytes() for p in sorted((coco128 / "train2017").glob("*.jpg"))[:n]]


def test_exact_decode_is_opencv_and_fast_is_within_tolerance(coco128):
    means = []
    for data in _photos(coco128, 24):
        ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB).astype(np.int16)
        assert np.array_equal(decode_rgb(data), ref)
        diff = np.abs(decode_rgb(data, fast=True).astype(np.int16) - ref)
        means.append(diff.mean())
        assert diff.mean() <= FAST_IMAGE_TOL, diff.mean()
        assert np.percentile(diff, 99) <= 8  # sharp edges move more; 99 % of pixels within 8 levels
    assert np.mean(means) <= FAST_MEAN_TOL


def test_training_decodes_exactly_unless_fast_is_asked(tmp_path):
    """Training sees the pixels validation and OpenCV see (the fast DCT is opt-in: it saved 1-5 %
    of decode time for 1-2 dB of PSNR on packed JPEGs); with fast_decode=True some pixels move."""
    recs = make_records(8, "train", seed=4)
    root = pack(tmp_path / "wds", "wds", {"train": recs}, {"train": [8]})
    with open_reader("wds", root / "train" / "train-00000.tar") as r:
        stored = {rec.key: rec.jpeg for rec in r}
    diffs = {}
    for fast in (False, True):
        ld = make_loader(root, "train", loader="torch", imgsz=256, batch=4, workers=0, device="cpu",
                         augment=AugmentConfig.off(), fast_decode=fast)
        diffs[fast] = []
        for b in ld:
            for i, key in enumerate(b["keys"]):
                ref = cv2.imdecode(np.frombuffer(stored[key], np.uint8), cv2.IMREAD_COLOR_RGB)
                want = letterbox_image(ref, *ref.shape[:2], 256).astype(np.int16)
                diffs[fast].append(np.abs(b["img"][i].permute(1, 2, 0).numpy().astype(np.int16) - want).max())
    assert len(diffs[False]) == 8 and max(diffs[False]) == 0
    assert max(diffs[True]) > 0


def test_reduced_decode_is_as_faithful_as_full_decode_then_resize(coco128):
    """Against the anti-aliased reference (full decode + INTER_AREA), the DCT-domain reduced decode
    (+ INTER_LINEAR to the exact size) is no further off than full decode + INTER_LINEAR."""
    for data in _photos(coco128, 6):
        full = decode_rgb(data)
        h, w = full.shape[:2]
        target = reduce_target(h, w, 160)
        assert target is not None  # 640-px photos at imgsz 160: a DCT-domain reduction pays
        small = decode_rgb(data, min_hw=target)
        assert small.shape[0] >= target[0] and small.shape[1] >= target[1] and small.shape[0] < h
        nh, nw = target
        ref = cv2.resize(full, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.int16)
        linear = cv2.resize(full, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.int16)
        ours = letterbox_image(small, h, w, 160)
        _, _, px, py, _, _ = letterbox_geometry(h, w, 160)
        ours = ours[py : py + nh, px : px + nw].astype(np.int16)
        assert np.abs(ours - ref).mean() <= np.abs(linear - ref).mean() + 0.5


def test_reduced_decode_keeps_boxes_on_their_rectangles(tmp_path):
    """Stored images of 90-210 px at imgsz 64: the large ones are decoded at 1/2 or 1/4 in the DCT domain."""
    recs = make_records(16, "train", seed=9)
    root = pack(tmp_path / "wds", "wds", {"train": recs}, {"train": [16]})
    assert sum(reduce_target(r.height, r.width, 64) is not None for r in recs) >= 8
    for aug in (AugmentConfig.off(), AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0.0, scale=0.2)):
        ld = make_loader(root, "train", loader="torch", imgsz=64, batch=4, workers=0, device="cpu", augment=aug)
        checked = bad = 0
        for b in ld:
            img = b["img"].permute(0, 2, 3, 1).numpy()
            for (i, c), box in zip(torch.cat([b["batch_idx"][:, None], b["cls"]], 1).long().tolist(),
                                   (b["bboxes"] * 64).numpy(), strict=True):
                xyxy = np.array([box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2])
                iou, edge = rect_match(img[i], xyxy, c)
                checked += 1
                bad += iou < 0.8 and edge > 2.0
        assert checked >= 16 and bad == 0


def _corrupt_entropy(shard: Path, pos: int) -> tuple[str, bytes]:
    """Damage the middle of record `pos`'s entropy-coded data in place (headers and framing intact)."""
    with open_reader("wds", shard) as r:
        rec = r.read(pos)
    data = bytearray(shard.read_bytes())
    at = data.find(rec.jpeg)
    mid = at + len(rec.jpeg) // 2
    data[mid : mid + 40] = bytes(range(7, 47))
    shard.write_bytes(bytes(data))
    return rec.key, bytes(data[at : at + len(rec.jpeg)])


def test_corrupt_entropy_data_is_counted_and_substituted(tmp_path, caplog):
    recs = make_records(12, "train", seed=3)
    root = pack(tmp_path / "wds", "wds", {"train": recs}, {"train": [12]})
    key, damaged = _corrupt_entropy(root / "train" / "train-00000.tar", 5)
    assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV says nothing
    with pytest.raises(CorruptImage):
        decode_rgb(damaged)
    for kw in ({}, {"fast_decode": True}, {"cache": "disk", "cache_dir": tmp_path / "cache"}):
        ld = make_loader(root, "train", loader="torch", imgsz=64, batch=4, workers=0, device="cpu",
                         augment=AugmentConfig.off(), **kw)
        with caplog.at_level(logging.WARNING, logger="trainer.data"):
            batches = list(ld)
        assert len(batches) == len(ld) == 3 and ld.stats["corrupt_skipped"] == 1
        valid = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
        assert key not in valid and len(valid) == 11
        assert "corrupt" in caplog.text
        caplog.clear()
