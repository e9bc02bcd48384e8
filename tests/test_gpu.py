"""GPU paths (marker ``gpu``; skipped without CUDA): DALI ``mixed`` decoding and augmentation with
boxes on their rectangles, the torch loader's pinned copies, bf16 and fp16+GradScaler training,
``--batch -1``, and a 1-rank NCCL ``torchrun``. Run them with ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _data_util import make_records, pack, rect_match
from _train_util import packed, subprocess_env

from trainer.data import AugmentConfig, make_loader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IMGSZ = 160
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "yolo"
GEOMETRY = {
    "letterbox": AugmentConfig.off(),
    "mosaic": AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0, fliplr=0.5, scale=0.3, translate=0.1),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gpu")
    recs = {"train": make_records(24, "train", seed=1)}
    return {fmt: pack(base / fmt, fmt, recs, {"train": [7, 9, 8]}) for fmt in ("tfrecord", "wds")}


def _check_boxes(b: dict) -> tuple[int, list]:
    img = b["img"].permute(0, 2, 3, 1).cpu().numpy()
    checked, bad = 0, []
    rows = torch.cat([b["batch_idx"][:, None], b["cls"]], 1).long().cpu().tolist()
    for (i, c), box in zip(rows, (b["bboxes"] * IMGSZ).cpu().numpy(), strict=True):
        xyxy = np.array([box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2])
        iou, edge = rect_match(img[i], xyxy, c)
        checked += 1
        if iou < 0.9 and edge > 2.0:
            bad.append((round(iou, 3), round(edge, 2)))
    return checked, bad


@pytest.mark.parametrize("aug", list(GEOMETRY))
@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_dali_mixed_decoding_and_augmentation_keep_boxes(data, fmt, aug):
    ld = make_loader(data[fmt], "train", loader="auto", imgsz=IMGSZ, batch=4, device="cuda", augment=GEOMETRY[aug],
                     seed=3)
    assert ld.kind == "dali-gpu" and "CUDA" in ld.reason  # auto on CUDA: DALI with nvJPEG
    checked, bad = 0, []
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        n = 0
        for b in ld:
            n += 1
            assert b["img"].device.type == "cuda" and b["img"].shape == (4, 3, IMGSZ, IMGSZ)
            c, x = _check_boxes(b)
            checked, bad = checked + c, bad + x
        assert n == len(ld)
    ld.close()
    assert checked >= 40 and not bad, bad[:5]


def test_torch_loader_on_cuda_matches_cpu(data):
    kw = dict(loader="torch", imgsz=IMGSZ, batch=4, workers=2, augment=AugmentConfig.off(), fast_decode=False)
    gpu = make_loader(data["wds"], "train", device="cuda", **kw)
    cpu = make_loader(data["wds"], "train", device="cpu", **kw)
    for _ in range(2):  # twice: the shared batch buffers are reused after their pinned copies
        got = {k: b["img"][i].cpu() for b in gpu for i, k in enumerate(b["keys"])}
        want = {k: b["img"][i].clone() for b in cpu for i, k in enumerate(b["keys"])}
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    gpu.close()
    cpu.close()


@pytest.fixture(scope="module")
def shards() -> Path:
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    return packed(SAMPLE, size=160)


def _train(shards: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), "-m", "trainer.run", str(shards), "--epochs", "1", "--imgsz", "160",
           "--model", "yolov8n.yaml", "--out", str(out), "--device", "cuda", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)


def _losses(out: Path) -> list[float]:
    with open(out / "results.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return [float(row[k]) for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_step(shards, tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    p = _train(shards, tmp_path / amp, "--amp", amp, "--batch", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"AMP: {amp}" in p.stdout
    assert all(math.isfinite(v) and v > 0 for v in _losses(tmp_path / amp))


def test_batch_minus_one_picks_a_batch_that_fits(shards, tmp_path):
    p = _train(shards, tmp_path / "auto", "--batch", "-1")
    assert p.returncode == 0, p.stderr[-3000:]
    args = yaml.safe_load((tmp_path / "auto" / "args.yaml").read_text())
    assert int(args["batch"]) >= 1


def test_one_rank_nccl_torchrun(shards, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    p = _train(shards, tmp_path / "ddp", "--batch", "8", launcher=[torchrun, "--standalone", "--nproc_per_node=1"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(math.isfinite(v) for v in _losses(tmp_path / "ddp"))
