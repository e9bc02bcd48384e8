"""TensorBoardLog writes what tensorboard's own event reader finds; the --tensorboard default follows the install."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.config import TrainError
from trainer.tensorboard import TensorBoardLog, resolve_tensorboard, tensorboard_installed


def _read(out):
    (event,) = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(event), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_of_every_column_and_images_read_back(tmp_path):
    rows = [{"epoch": 1, "train/box_loss": 2.5, "metrics/mAP50-95(B)": 0.1, "img_per_s": 40.0, "lr/pg0": 1e-3},
            {"epoch": 2, "train/box_loss": 2.0, "metrics/mAP50-95(B)": 0.2, "img_per_s": 42.0, "lr/pg0": 5e-4}]
    picture = tmp_path / "train_batch0.jpg"
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :24] = (0, 0, 255)  # left half red (BGR)
    cv2.imwrite(str(picture), img)
    tb = TensorBoardLog(tmp_path, enabled=True)
    for r in rows:
        tb.scalars(r, r["epoch"])
    tb.images([picture], 1)
    tb.close()

    acc = _read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/box_loss", "metrics/mAP50-95(B)", "img_per_s", "lr/pg0"}
    for k in acc.Tags()["scalars"]:
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(k)] == [(r["epoch"], r[k]) for r in rows]
    (im,) = acc.Images("train_batch0")
    assert (im.step, im.width, im.height) == (1, 48, 32)


def test_disabled_writes_nothing(tmp_path):
    tb = TensorBoardLog(tmp_path, enabled=False)
    tb.scalars({"epoch": 1, "x": 1.0}, 1)
    tb.close()
    assert not list(tmp_path.iterdir())


def test_default_is_on_when_installed_and_an_explicit_request_is_honoured():
    assert tensorboard_installed()  # the [train] environment pins it
    assert resolve_tensorboard(None) is True
    assert resolve_tensorboard(False) is False
    assert resolve_tensorboard(True) is True


def test_asking_for_it_without_the_package_is_a_usage_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    assert resolve_tensorboard(None) is False
    with pytest.raises(TrainError, match="pip install tensorboard"):
        resolve_tensorboard(True)


def test_writing_never_imports_tensorflow(tmp_path):
    """Where TensorFlow is installed (this test environment), the writer still uses tensorboard's TF-free stub:
    no TF start-up cost, warnings or exit-time threads in a training process."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from trainer.tensorboard import TensorBoardLog; "
            f"t = TensorBoardLog(Path({str(tmp_path)!r}), enabled=True); t.scalars({{'epoch': 1, 'x': 2.0}}, 1); "
            "t.close(); print('tensorflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("x")] == [(1, 2.0)]
