"""trainer.model: offline model build, weight transfer, checkpoints ultralytics loads, resume state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.model import (
    ModelError,
    attach_hyp,
    build_model,
    load_resume_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_build_model_offline_with_dataset_classes():
    m = build_model("yolo11n.yaml", ["cat", "dog"])
    assert m.nc == 2 and m.names == {0: "cat", 1: "dog"}
    assert m.stride.tolist() == [8.0, 16.0, 32.0]
    assert m.yaml["scale"] == "n"


@pytest.mark.parametrize("name", ["yolo99n.yaml", "yolov8n.pt", "nonsense"])
def test_build_model_rejects_unknown_or_non_yaml(name):
    with pytest.raises(ModelError):
        build_model(name, ["a"])


def _tiny_ckpt(tmp_path, names, **kw):
    m = build_model("yolov8n.yaml", names)
    p = tmp_path / "w.pt"
    save_checkpoint([p], m, epoch=0, train_args={"imgsz": 64, "model": "yolov8n.yaml"}, **kw)
    return m, p


def test_load_weights_transfers_matching_layers_and_counts(tmp_path):
    src, p = _tiny_ckpt(tmp_path, ["a", "b", "c"])
    dst = build_model("yolov8n.yaml", ["x", "y"])  # other class count: the class head's last conv differs
    loaded, total, arch = load_weights(dst, p)
    assert total // 2 < loaded < total and arch == "yolov8n.yaml"
    other = build_model("yolo11n.yaml", ["x", "y"])  # another architecture: few tensors fit
    assert load_weights(other, p)[0] < len(other.state_dict()) // 2
    key = "model.0.conv.weight"
    assert torch.equal(dst.state_dict()[key], src.state_dict()[key].half().float())
    assert dst.names == {0: "x", 1: "y"}  # the dataset's names win


def test_load_weights_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(ModelError, match="never downloaded"):
        load_weights(build_model("yolov8n.yaml", ["a"]), tmp_path / "yolov8n.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # torch.jit in export
def test_checkpoint_is_atomic_and_ultralytics_loadable(tmp_path):
    from ultralytics import YOLO

    _, p = _tiny_ckpt(tmp_path, ["a", "b"])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.pt"]  # no temp file left behind
    y = YOLO(str(p))
    assert y.names == {0: "a", 1: "b"}
    res = y.predict(np.zeros((64, 96, 3), np.uint8), imgsz=64, verbose=False)
    assert len(res) == 1
    exported = y.export(format="torchscript", imgsz=64)  # export works offline too
    assert str(exported).endswith(".torchscript") and (tmp_path / "w.torchscript").is_file()


def test_resume_state_needs_optimizer(tmp_path):
    m, p = _tiny_ckpt(tmp_path, ["a"])
    with pytest.raises(ModelError, match="not a resumable"):
        load_resume_state(p)
    attach_hyp(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    q = tmp_path / "last.pt"
    save_checkpoint([q], m, epoch=3, train_args={"imgsz": 64}, optimizer=opt)
    ck = load_resume_state(q)
    assert ck["epoch"] == 3 and ck["optimizer"]["param_groups"][0]["lr"] == 0.1
    with pytest.raises(ModelError, match="no such file"):
        load_resume_state(tmp_path / "missing.pt")


def test_rng_state_round_trip():
    st = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
