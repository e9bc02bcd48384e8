"""Trainer options that are not finite or not sensible: exit 2 with one line naming the option.

Run through the real CLI (`trainer.run.main` in process, and once as `python -m trainer.run`) on a real
packed dataset, so the only thing wrong is the option; no run folder may be created.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from packer.build import build_dataset
from trainer.engine import TrainConfig, TrainError
from trainer.run import main

ROOT = Path(__file__).resolve().parents[1]

BAD = [
    ("--lr0", "nan"), ("--lr0", "inf"), ("--lr0", "-inf"), ("--lr0", "0"), ("--lr0", "-0.01"),
    ("--lrf", "0"), ("--lrf", "-1"), ("--lrf", "nan"), ("--lrf", "2"),
    ("--momentum", "-0.1"), ("--momentum", "1"), ("--momentum", "1.5"), ("--momentum", "nan"),
    ("--weight-decay", "-0.0005"), ("--weight-decay", "inf"),
    ("--warmup-epochs", "-1"), ("--warmup-epochs", "nan"),
    ("--epochs", "0"), ("--epochs", "-3"),
    ("--batch", "0"), ("--batch", "-2"),
    ("--nbs", "0"),
    ("--imgsz", "0"), ("--imgsz", "-64"), ("--imgsz", "100"), ("--imgsz", "16"),
    ("--patience", "-1"),
    ("--seed", "-1"), ("--seed", str(2**40)),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("args") / "ds"
    build_dataset(ROOT / "samples" / "yolo", out, fmt="wds", size=64, workers=1, progress=False)
    return out


@pytest.mark.parametrize("option, value", BAD, ids=[f"{o}={v}" for o, v in BAD])
def test_bad_option_exits_2_with_one_line(shards, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        main([str(shards), option, value, "--out", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("Error: ") and option in lines[0]
    assert not (tmp_path / "runs").exists()


def test_library_config_checks_the_same_rules():
    TrainConfig(shards="x").validate()  # the defaults pass
    TrainConfig(shards="x", batch=-1, imgsz=320, patience=0, warmup_epochs=0, momentum=0.0).validate()
    for field, value in [("lr0", float("nan")), ("momentum", -0.5), ("weight_decay", float("-inf")),
                         ("epochs", 1.5), ("batch", True), ("box", float("nan")), ("max_det", 0),
                         ("workers", -1), ("cache_max_bytes", 0), ("lr0", "0.01"), ("amp", "fp8")]:
        with pytest.raises(TrainError, match=f"--{field.replace('_', '-')} must be"):
            TrainConfig(shards="x", **{field: value}).validate()


def test_python_m_trainer_run_refuses_nan_lr(shards, tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer.run", str(shards), "--lr0", "nan", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--lr0 must be a number > 0, got nan" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value, words", [
    ("gpu", "--device must be auto, cpu, cuda, cuda:N or N, got 'gpu'"),
    ("cuda:x", "--device 'cuda:x': not a device name"),
    *([] if __import__("torch").cuda.is_available() else [
        ("cuda", "--device cuda: CUDA is not available here; use 'auto' or 'cpu'"),
        ("1", "--device cuda:1: CUDA is not available here")]),
])
def test_bad_device_is_one_line(shards, tmp_path, capsys, value, words):
    """The trainer and make_loader read devices with one helper and say the same."""
    with pytest.raises(SystemExit) as e:
        main([str(shards), "--device", value, "--out", str(tmp_path / "runs")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and words in lines[0], lines


def test_auto_device_under_torchrun_checks_the_local_rank_gpu_exists(monkeypatch):
    """torchrun with more processes than GPUs: `auto` gives rank 7 cuda:7, which must be refused in one
    line like an explicit cuda:7 (the machine's CUDA is stood in for: this checks our range rule)."""
    import torch

    from trainer.data.common import DataError, default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "7")
    with pytest.raises(DataError, match=r"device cuda:7: 2 CUDA device\(s\) here"):
        default_device("auto", rank=7)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device("auto", rank=1) == torch.device("cuda", 1)


def test_optimizer_names_in_any_case_on_the_command_line(tmp_path, capsys):
    """`--optimizer sgd` was refused by click; `optimizer: sgd` in --cfg was accepted."""
    with pytest.raises(SystemExit):
        main([str(tmp_path / "none"), "--optimizer", "sgd"])
    err = capsys.readouterr().err
    assert "Invalid value" not in err and "manifest.json" in err, err  # parsed; went on to the (missing) data


def test_fraction_shrinks_the_batch_like_a_small_split_and_auto_notes_a_given_lr0(shards, tmp_path, capsys):
    """12 train images, --fraction 0.25 keeps 3: --batch 4 was refused; now batch 3, one step."""
    main([str(shards), "--fraction", "0.25", "--batch", "4", "--epochs", "1", "--imgsz", "64", "--lr0", "0.02",
          "--model", "yolov8n.yaml", "--out", str(tmp_path / "runs"), "--device", "cpu", "--no-plots",
          "--no-tensorboard", "--val-split", "none"])
    out = capsys.readouterr().out
    assert "train split 'train' 12 images (fraction 0.25: 3)" in out, out
    assert "--batch 4 is larger than the 3 training images: using batch 3" in out
    assert "note: optimizer auto chooses lr0 and momentum itself: the lr0 given is ignored" in out
