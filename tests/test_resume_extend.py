"""--resume last.pt --epochs N on a finished run trains on to N with the schedule, EMA and optimizer carried over;
without a larger --epochs it is a one-line refusal."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from _train_util import packed
from click.testing import CliRunner

from trainer.run import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "yolo"
TINY = ["--imgsz", "64", "--batch", "4", "--model", "yolov8n.yaml", "--device", "cpu", "--loader", "torch",
        "--workers", "0", "--optimizer", "SGD", "--lr0", "0.01", "--lrf", "0.01", "--nbs", "4", "--no-plots", "--no-tensorboard"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    shards = packed(SAMPLE, size=160)
    out = tmp_path_factory.mktemp("extend") / "run"
    r = CliRunner().invoke(main, [str(shards), "--epochs", "2", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output[-3000:]
    ck = torch.load(out / "weights" / "last.pt", weights_only=False)
    return shards, out, {"updates": ck["updates"], "epoch": ck["epoch"]}


def test_resuming_a_finished_run_without_more_epochs_is_refused(finished_run):
    _, out, _ = finished_run
    for extra in ([], ["--epochs", "2"], ["--epochs", "1"]):
        r = CliRunner().invoke(main, ["--resume", str(out / "weights" / "last.pt"), *extra])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "already finished (2 done)" in lines[0] and "--epochs larger than 2" in lines[0]
    assert [r["epoch"] for r in _rows(out / "results.csv")] == ["1", "2"]  # nothing was touched


def test_larger_epochs_extends_with_schedule_ema_and_optimizer_carried(finished_run):
    shards, out, before = finished_run
    last = out / "weights" / "last.pt"
    r = CliRunner().invoke(main, ["--resume", str(last), "--epochs", "3", "--plots"])  # plots may change on resume
    assert r.exit_code == 0, r.output[-3000:]
    assert "training to 3 epochs instead of 2" in r.output and "epoch 3 of 3" in r.output

    rows = _rows(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # the lr lambda runs over the new total: linear 1 -> lrf over 3 epochs, at epoch index 2 (0.34 x lr0);
    # over the old total of 2 it would have been lrf (0.01 x lr0)
    lr0, lrf = 0.01, 0.01
    assert float(rows[2]["lr/pg0"]) == pytest.approx(lr0 * ((1 - 2 / 3) * (1 - lrf) + lrf), rel=1e-3)
    assert float(rows[1]["lr/pg0"]) == pytest.approx(lr0 * ((1 - 1 / 2) * (1 - lrf) + lrf), rel=1e-3)

    ck = torch.load(last, weights_only=False)
    assert ck["epoch"] == 2 and ck["train_args"]["epochs"] == 3
    # nbs 4 = batch: one optimizer step (and EMA update) per batch, 3 batches per epoch; the EMA's count goes on
    assert before["updates"] == 6 and ck["updates"] == 9
    momentum = [s["momentum_buffer"] for s in ck["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert momentum, "SGD momentum buffers carried in the optimizer state"
    assert yaml.safe_load((out / "args.yaml").read_text())["epochs"] == 3
    # the end-of-run plots validate the best weights, read from best.pt when no extension epoch beats them
    assert "plots of the best weights' validation" in r.output
    assert (out / "confusion_matrix.png").is_file() and (out / "BoxPR_curve.png").is_file()


def test_resume_epochs_are_still_validated(finished_run):
    _, out, _ = finished_run
    r = CliRunner().invoke(main, ["--resume", str(out / "weights" / "last.pt"), "--epochs", "0"])
    assert r.exit_code == 2 and "--epochs must be an integer >= 1" in r.stderr


def test_extending_an_auto_optimizer_run_keeps_the_lr_auto_chose(tmp_path):
    """'auto' picks AdamW at lr 0.002*5/(4+nc); the resumed schedule must run from that lr, not from --lr0."""
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    shards, out = packed(SAMPLE, size=160), tmp_path / "run"
    auto = [a for a in TINY if a not in ("--optimizer", "SGD")] + ["--optimizer", "auto"]
    r = CliRunner().invoke(main, [str(shards), "--epochs", "2", "--out", str(out), *auto])
    assert r.exit_code == 0, r.output[-3000:]
    r = CliRunner().invoke(main, ["--resume", str(out / "weights" / "last.pt"), "--epochs", "3"])
    assert r.exit_code == 0, r.output[-3000:]
    lr_fit, lrf = round(0.002 * 5 / (4 + 80), 6), 0.01
    assert "AdamW(lr=0.000119, momentum=0.9)" in r.output  # as the first run logged it (not cfg's 0.937)
    assert torch.load(out / "weights" / "last.pt", weights_only=False)["optimizer"]["param_groups"][0]["betas"][0] == 0.9
    rows = _rows(out / "results.csv")
    assert float(rows[2]["lr/pg0"]) == pytest.approx(lr_fit * ((1 - 2 / 3) * (1 - lrf) + lrf), rel=1e-3)


def test_resume_on_other_data_is_refused_and_on_moved_data_goes_on(finished_run, tmp_path):
    """The shards argument of a resume may point where the data moved, never at other data."""
    import shutil

    from packer.build import build_dataset
    from packer.convert import convert_dataset

    shards, out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)  # this test's own copy: the extension test above shares `out`
    last = run / "weights" / "last.pt"
    done = [row["epoch"] for row in _rows(run / "results.csv")]  # 2, or 3 after the extension test
    more = str(len(done) + 1)
    src = tmp_path / "fewer"
    shutil.copytree(SAMPLE, src)
    drop = sorted((src / "images" / "train").iterdir())[0]
    drop.unlink()
    (src / "labels" / "train" / f"{drop.stem}.txt").unlink(missing_ok=True)
    other = build_dataset(src, tmp_path / "other", size=160, workers=1).out  # same classes, one image fewer
    r = CliRunner().invoke(main, [str(other), "--resume", str(last), "--epochs", more])
    assert r.exit_code == 2, r.output[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not the data this run trained on (train images: 11, the checkpoint's: 12)" in lines[0]
    assert "--weights CHECKPOINT" in lines[0]
    assert [row["epoch"] for row in _rows(run / "results.csv")] == done  # nothing was touched

    moved = tmp_path / "moved-wds"
    convert_dataset(shards, moved, "wds")  # the same samples, another format
    r = CliRunner().invoke(main, [str(moved), "--resume", str(last), "--epochs", more])
    assert r.exit_code == 0, r.output[-3000:]
    assert [row["epoch"] for row in _rows(run / "results.csv")] == [*done, more]
    assert torch.load(last, weights_only=False)["data_identity"]["train"]["samples"] == 12
