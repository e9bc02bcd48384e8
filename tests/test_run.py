"""python -m trainer.run end to end on the packed sample (real packer, real make_loader), resume, usage errors."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from _train_util import packed, subprocess_env, train_cmd
from click.testing import CliRunner

from trainer.run import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "yolo"
COLUMNS = [
    "epoch", "time", "train/box_loss", "train/cls_loss", "train/dfl_loss",
    "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
    "val/box_loss", "val/cls_loss", "val/dfl_loss", "lr/pg0", "lr/pg1", "lr/pg2",
    "img_per_s", "data_stall_pct", "gpu_mem_gb",
]


@pytest.fixture(scope="module")
def shards() -> Path:
    if not (SAMPLE / "data.yaml").is_file():
        pytest.skip("samples/yolo not present")
    return packed(SAMPLE, size=160)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_epochs_write_checkpoints_csv_and_predict(shards, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(train_cmd(shards, out), capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "AMP: off" in p.stdout and "data stall" in p.stdout
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "args.yaml"):
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.tmp"))
    with open(out / "results.csv", newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = _rows(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["train/box_loss"]) > 0 and float(r["img_per_s"]) > 0 for r in rows)
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["epochs"] == 2 and args["imgsz"] == 128 and args["batch"] == 4 and args["accumulate"] == 6

    assert torch.load(out / "weights" / "best.pt", weights_only=False)["optimizer"] is None  # stripped at the end
    assert torch.load(out / "weights" / "last.pt", weights_only=False)["optimizer"] is not None

    from ultralytics import YOLO

    y = YOLO(str(out / "weights" / "best.pt"))
    assert len(y.names) == 80 and y.names[0] == "person"
    res = y.predict(str(next((SAMPLE / "images" / "val").glob("*.jpg"))), imgsz=128, verbose=False)
    assert len(res) == 1 and res[0].boxes is not None


def test_killed_mid_training_then_resume_finishes(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, out, "--loader", "torch", "--workers", "0", epochs=3),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "weights" / "last.pt").exists():  # written atomically after epoch 1
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # SIGKILL during epoch 2: no chance to clean up
    finally:
        proc.wait(timeout=60)
    assert (out / "weights" / "last.pt").is_file()
    assert torch.load(out / "weights" / "last.pt", weights_only=False)["epoch"] == 0

    p = subprocess.run([*train_cmd(shards, out)[:3], "--resume", str(out / "weights" / "last.pt")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout
    rows = _rows(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    ck = torch.load(out / "weights" / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["train_args"]["epochs"] == 3


def test_ctrl_c_writes_last_pt_and_exits_130(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, out, "--loader", "torch", "--workers", "0", epochs=20),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "weights" / "last.pt").exists():
            time.sleep(0.05)
        (out / "weights" / "last.pt").unlink()  # so the file below can only come from the Ctrl-C path
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-2000:]
    assert "interrupted in epoch" in stdout
    assert (out / "weights" / "last.pt").is_file()


@pytest.mark.parametrize("argv, message", [
    ([], "missing argument SHARDS"),
    (["{shards}", "--imgsz", "100"], "multiple of 32"),
    (["{shards}", "--model", "yolo99n.yaml"], "unknown model"),
    (["{shards}", "--amp", "fp16", "--device", "cpu"], "needs a CUDA device"),
    (["{shards}", "--val-split", "test"], "not in"),
    (["{shards}", "--optimizer", "Lion"], "Invalid value"),
    (["{shards}", "--weights", "{tmp}/none.pt"], "never downloaded"),
    (["--resume", "{tmp}/none.pt"], "no such file"),
    (["{tmp}"], "manifest.json not found"),
])
def test_usage_errors_exit_2_with_one_line(shards, tmp_path, argv, message):
    args = [a.format(shards=shards, tmp=tmp_path) for a in argv] + ["--epochs", "1", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]  # progress lines go to stdout
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr


# ------------------------------------------------------------------ engine rules (no subprocess)

def test_accumulation_and_amp_rules():
    from trainer.engine import TrainError, accumulate_steps, choose_amp

    assert [accumulate_steps(64, b) for b in (4, 16, 24, 64, 128)] == [16, 4, 3, 1, 1]
    cpu = torch.device("cpu")
    assert choose_amp("auto", cpu)[:2] == (None, False)
    assert choose_amp("off", cpu)[:2] == (None, False)
    assert choose_amp("bf16", cpu)[:2] == (torch.bfloat16, False)
    with pytest.raises(TrainError, match="CUDA"):
        choose_amp("fp16", cpu)


def test_resume_config_keeps_checkpoint_options():
    from trainer.engine import TrainConfig, resume_config

    ckpt_args = {**TrainConfig(shards="a", epochs=7, batch=8, imgsz=256, workers=2).__dict__, "extra": 1}
    cfg, ignored = resume_config(TrainConfig(resume="x.pt", workers=4, batch=32), ckpt_args)
    assert (cfg.epochs, cfg.batch, cfg.imgsz, cfg.shards, cfg.resume) == (7, 8, 256, "a", "x.pt")
    assert cfg.workers == 4  # allowed to change on resume
    assert ignored == ["batch"]
    # epochs may change (a larger total extends the run); `given` counts an option set to its default value too
    cfg, ignored = resume_config(TrainConfig(resume="x.pt", epochs=100, batch=16), ckpt_args, given={"epochs", "batch"})
    assert (cfg.epochs, cfg.batch, ignored) == (100, 8, ["batch"])
    cfg, _ = resume_config(TrainConfig(resume="x.pt", epochs=100), ckpt_args, given=set())
    assert cfg.epochs == 7


class _SlowLoader:
    """Wraps the stand-in loader; each batch takes a second to arrive (a starved model)."""

    def __init__(self, *a, **kw):
        from _train_util import StandInLoader

        self.inner = StandInLoader(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for b in self.inner:
            if self.inner.train:
                time.sleep(1.0)
            yield b


def test_data_stall_meter_warns_when_starved(tmp_path):
    from _train_util import fake_pack, synthetic_yolo

    from trainer.engine import TrainConfig, train

    shards = fake_pack(synthetic_yolo(), tmp_path / "shards")
    lines: list[str] = []
    train(TrainConfig(shards=str(shards), model="yolov8n.yaml", epochs=1, batch=6, imgsz=64, out=str(tmp_path / "r"),
                      device="cpu"), loader_factory=_SlowLoader, log=lines.append)
    row = _rows(tmp_path / "r" / "results.csv")[0]
    assert float(row["data_stall_pct"]) > 10
    assert any("waiting for data" in ln and "--workers" in ln for ln in lines)


def test_cache_disk_trains_from_one_decoded_store(shards, tmp_path):
    """--cache disk: the loader is fed from the node's decoded store under --cache-dir, recorded in args.yaml."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    p = subprocess.run(train_cmd(shards, out, "--cache", "disk", "--cache-dir", str(cache), "--no-plots", epochs=1),
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert yaml.safe_load((out / "args.yaml").read_text())["cache"] == "disk"
    stores = [d for d in (cache / "decoded").iterdir() if d.is_dir()]
    assert stores and all((d / "meta.json").is_file() for d in stores), stores
    assert "loader: torch" in p.stdout
