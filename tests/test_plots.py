"""ultralytics' plots in the run folder of a real (tiny) training run, and none with --no-plots."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from _train_util import packed
from click.testing import CliRunner

from trainer.run import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "yolo"
TINY = ["--epochs", "2", "--imgsz", "64", "--batch", "4", "--model", "yolov8n.yaml", "--device", "cpu",
        "--loader", "torch", "--workers", "0"]
# file -> smallest sensible (height, width)
PICTURES = {
    "labels.jpg": (400, 400),
    "train_batch0.jpg": (64, 64), "train_batch1.jpg": (64, 64), "train_batch2.jpg": (64, 64),
    "val_batch0_labels.jpg": (64, 64), "val_batch0_pred.jpg": (64, 64),
    "results.png": (400, 800),
    "confusion_matrix.png": (400, 400), "confusion_matrix_normalized.png": (400, 400),
    "BoxPR_curve.png": (300, 400), "BoxF1_curve.png": (300, 400), "BoxP_curve.png": (300, 400),
    "BoxR_curve.png": (300, 400),
}


@pytest.fixture(scope="module")
def shards() -> Path:
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    return packed(SAMPLE, size=160)


@pytest.fixture(scope="module")
def plotted_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plots") / "run"
    r = CliRunner().invoke(main, [str(shards), "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output[-3000:]
    return out


def test_every_plot_is_a_valid_image_of_sensible_size(plotted_run):
    for name, (min_h, min_w) in PICTURES.items():
        img = cv2.imread(str(plotted_run / name), cv2.IMREAD_COLOR)
        assert img is not None, f"{name} missing or not an image"
        assert img.shape[0] >= min_h and img.shape[1] >= min_w, (name, img.shape)
        assert float(img.std()) > 5, f"{name} is blank"
    assert not list(plotted_run.glob(".plots-*")), "staging folders left behind"
    assert not list(plotted_run.glob("train_batch3*")), "only the first three batches are drawn"


def test_train_batch_shows_the_augmented_input_with_boxes(plotted_run):
    """ultralytics draws the batch as a grid of 64-px tiles (4 images -> 2x2) with coloured box outlines."""
    img = cv2.imread(str(plotted_run / "train_batch0.jpg"))
    assert img.shape[:2] == (128, 128)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    assert (hsv[..., 1] > 150).mean() > 0.01, "no saturated box/label colours drawn"


def test_results_png_reads_our_csv_with_its_extra_columns(plotted_run):
    with open(plotted_run / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"img_per_s", "data_stall_pct", "gpu_mem_gb"} <= set(header)
    img = cv2.imread(str(plotted_run / "results.png"))
    assert img.shape[1] > img.shape[0]  # ultralytics' 2-row grid of the 10 loss/metric columns


def test_tensorboard_event_file_holds_every_results_column(plotted_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(plotted_run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    with open(plotted_run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for col in rows[0]:
        if col == "epoch":
            continue
        got = acc.Scalars(col)
        assert [e.step for e in got] == [1, 2], col
        assert np.allclose([e.value for e in got], [float(r[col]) for r in rows], rtol=1e-4, atol=1e-6), col
    assert {"train_batch0", "train_batch1", "train_batch2"} <= set(acc.Tags()["images"])


def test_no_plots_and_no_tensorboard_write_no_pictures(shards, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [str(shards), "--out", str(out), *TINY[:1], "1", *TINY[2:],
                                  "--no-plots", "--no-tensorboard"])
    assert r.exit_code == 0, r.output[-3000:]
    assert (out / "results.csv").is_file()
    assert not [p for p in out.iterdir() if p.suffix in (".jpg", ".png")]
    assert not list(out.glob("events.out.tfevents.*"))
