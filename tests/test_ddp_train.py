"""torchrun --nproc_per_node=2 (gloo, CPU): one epoch, equal steps on both ranks, only rank 0 writes."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest
from _train_util import PY, packed, subprocess_env

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "yolo"


def test_torchrun_two_ranks_one_epoch(tmp_path):
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    shards = packed(SAMPLE, size=160)
    out = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.run", str(shards),
           "--epochs", "1", "--imgsz", "128", "--batch", "4", "--model", "yolov8n.yaml", "--out", str(out),
           "--device", "cpu", "--no-plots", "--no-tensorboard"]  # plots: tests/test_plots.py
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "DDP world size 2 (gloo)" in p.stdout
    steps = re.search(r"steps per rank: (\d+), (\d+)", p.stdout)
    assert steps and steps.group(1) == steps.group(2) and int(steps.group(1)) > 0
    # rank 0 alone writes: one run folder, one csv row, no stray files from rank 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]
    assert sorted(str(x.relative_to(out)) for x in out.rglob("*")) == [
        "args.yaml", "results.csv", "weights", "weights/best.pt", "weights/last.pt"]
    with open(out / "results.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    # quiet on rank 1: the run's lines are printed once
    assert p.stdout.count("AMP: off") == 1


def test_torchrun_ctrl_c_stops_every_rank_and_writes_last(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: every rank stops at the same step, no hang."""
    import os
    import signal
    import time

    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    shards = packed(SAMPLE, size=160)
    out = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.run", str(shards),
           "--epochs", "30", "--imgsz", "128", "--batch", "4", "--model", "yolov8n.yaml", "--out", str(out),
           "--device", "cpu", "--loader", "torch", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "weights" / "last.pt").exists():
            time.sleep(0.05)
        (out / "weights" / "last.pt").unlink()  # only the Ctrl-C path can write it again
        os.killpg(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)  # a hang fails here
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "interrupted in epoch" in stdout, stdout[-3000:]
    assert (out / "weights" / "last.pt").is_file()
    assert proc.returncode != 0


def test_a_val_split_smaller_than_the_ranks_is_refused_before_the_cache_is_built(tmp_path):
    """It used to fail on each rank naming neither the split nor the way out, after the train cache was built."""
    import shutil

    from packer.build import build_dataset

    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src)
    for img in sorted((src / "images" / "val").iterdir())[1:]:
        img.unlink()
    shards = tmp_path / "shards"
    build_dataset(src, shards, fmt="wds", size=64, workers=1)
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.run", str(shards),
           "--epochs", "1", "--imgsz", "64", "--batch", "4", "--model", "yolov8n.yaml", "--out", str(tmp_path / "run"),
           "--device", "cpu", "--no-plots", "--no-tensorboard", "--cache", "disk", "--cache-dir", str(tmp_path / "c")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode != 0
    assert "the val split 'val' has 1 images: fewer than the 2 processes that must share it; pass --val-split none" \
        in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "c").exists()  # refused before any decoded store was built
