"""The ultralytics plug-in: `YOLO(cfg).train(data=SHARDS, trainer=ShardsTrainer)` on packed coco128.

Everything after the data is ultralytics' own (results.csv, plots, best.pt, final validation),
so the checks are on what ultralytics writes, read back with ultralytics.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from ultralytics import YOLO  # offline: conftest sets YOLO_OFFLINE and a throw-away YOLO_CONFIG_DIR

from packer.build import build_dataset
from packer.format import read_manifest
from tests._servers import http_files
from trainer.ultralytics import ShardsTrainer, ShardsValidator


@pytest.fixture(scope="module")
def shards(coco128: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "coco128"
    build_dataset(coco128, out, fmt="tfrecord", size=160, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[YOLO, Path]:
    """The issue's run: two epochs of yolov8n from scratch on packed coco128, through YOLO().train()."""
    project = tmp_path_factory.mktemp("runs")
    model = YOLO("yolov8n.yaml")
    model.train(data=str(shards), trainer=ShardsTrainer, device="cpu", epochs=2, imgsz=160, batch=8, workers=0,
                project=str(project), name="run", seed=0)
    return model, project / "run"


def test_yolo_train_on_shards(trained: tuple[YOLO, Path], shards: Path, coco128: Path) -> None:
    model, run = trained
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    for r in rows:
        for k in ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/precision(B)", "metrics/recall(B)"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r[k])
        for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss"):
            assert math.isfinite(float(r[k])) and float(r[k]) > 0, (k, r[k])
    # the final validation of best.pt went through our val loader and counted each of the 128 samples once
    assert model.trainer.validator.seen == 128
    for name in ("labels.jpg", "train_batch0.jpg", "val_batch0_labels.jpg", "val_batch0_pred.jpg",
                 "results.png", "confusion_matrix.png", "BoxPR_curve.png"):
        im = cv2.imread(str(run / name))
        assert im is not None and min(im.shape[:2]) >= 160, name

    best = YOLO(str(run / "weights" / "best.pt"))
    assert list(best.names.values()) == read_manifest(shards).names
    image = next((coco128 / "train2017").glob("*.jpg"))
    res = best.predict(str(image), imgsz=160, device="cpu", verbose=False)
    assert len(res) == 1 and res[0].orig_shape == cv2.imread(str(image)).shape[:2]


def test_standalone_val_counts_padded_samples_once(trained: tuple[YOLO, Path], shards: Path, tmp_path: Path) -> None:
    """`model.val(validator=ShardsValidator)`: 128 samples in batches of 12 leave 4 padding samples
    (valid=False) in the last batch; ultralytics' metrics must see 128 images and all 929 boxes."""
    _, run = trained
    best = YOLO(str(run / "weights" / "best.pt"))
    seen: list[int] = []
    best.add_callback("on_val_end", lambda v: seen.append(v.seen))
    metrics = best.val(validator=ShardsValidator, batch=12, imgsz=160, device="cpu", plots=False,
                       project=str(tmp_path), name="val")  # data: the shards best.pt was trained on
    assert seen == [128]
    assert int(metrics.nt_per_class.sum()) == read_manifest(shards).splits["train2017"].num_boxes
    assert set(metrics.results_dict) >= {"metrics/mAP50(B)", "metrics/mAP50-95(B)"}


def test_classes_keeps_only_those_labels(trained: tuple[YOLO, Path], shards: Path, tmp_path: Path) -> None:
    """ultralytics' `classes=[0]`: the validation scores person boxes only (it was silently ignored), and the
    training batches lose the other classes' labels the same way (`keep_classes`, one helper for both)."""
    import numpy as np
    import torch

    from packer.format import LabelArrays
    from trainer.data.common import keep_classes

    _, run = trained
    best = YOLO(str(run / "weights" / "best.pt"))
    metrics = best.val(validator=ShardsValidator, classes=[0], batch=16, imgsz=160, device="cpu", plots=False,
                       project=str(tmp_path), name="val")
    la = LabelArrays.load(shards / read_manifest(shards).splits["train2017"].labels)
    per_class = np.asarray(metrics.nt_per_class)
    assert per_class[0] == int((la.cls == 0).sum()) > 0 and per_class[1:].sum() == 0
    b = {"cls": torch.tensor([[0.0], [3.0], [0.0]]), "bboxes": torch.rand(3, 4), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
         "img": torch.zeros(2, 3, 8, 8)}
    kept = keep_classes(b, 3)
    assert kept["cls"].view(-1).tolist() == [3.0] and torch.equal(kept["bboxes"], b["bboxes"][1:2])
    assert kept["batch_idx"].tolist() == [0.0] and keep_classes(b, None) is b


def test_fraction_and_cache_reach_our_loader(shards: Path, tmp_path: Path) -> None:
    """ultralytics' `fraction` (train split only) and `cache` act through make_loader: 8 of 128 images, a decoded
    store under the cache_dir given to ShardsTrainer.options (they were dropped with a warning). A batch larger
    than those 8 trains with 8 (it was a SplitError traceback); workers=0, ultralytics' choice on CPU, reads in
    process (it became the default worker count); the class counts follow classes=[0]."""
    seen: list[tuple] = []
    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_start", lambda t: seen.append(
        (len(t.train_loader), t.train_loader.batch_size, t.train_loader.loader.kind, t.train_loader.loader.workers,
         int((t.get_class_counts() > 0).sum()))))
    model.train(data=str(shards), trainer=ShardsTrainer.options(cache_dir=str(tmp_path / "cache")), device="cpu",
                epochs=1, imgsz=64, batch=16, workers=0, fraction=0.0625, cache="disk", plots=False, classes=[0],
                project=str(tmp_path), name="run")
    assert seen == [(1, 8, "torch", 0, 1)]
    # coco128 has one split, which trains and validates here: one store serves both loaders
    assert [d.name.split("-")[0] for d in (tmp_path / "cache" / "decoded").iterdir()] == ["train2017"]


_CHILD = """
import json
print(json.dumps({"cls": f"{type(trainer).__module__}.{type(trainer).__qualname__}", "loader": trainer.loader,
                  "train": trainer.data["train"], "val": trainer.data["val"], "nc": trainer.data["nc"]}))
"""


def test_ultralytics_ddp_script_rebuilds_the_trainer(shards: Path, tmp_path: Path) -> None:
    """ultralytics' own DDP launch (device=[0,1]) pickles the trainer class into a temp script that each
    torch.distributed.run worker executes; here that exact script runs (train() replaced by a report)."""
    pytest.importorskip("cloudpickle")
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    cls = ShardsTrainer.options(loader="torch")
    trainer = cls(overrides={"model": "yolov8n.yaml", "data": str(shards), "device": "cpu", "epochs": 1,
                             "imgsz": 160, "project": str(tmp_path), "name": "ddp"})
    file = generate_ddp_file(trainer)
    try:
        text = Path(file).read_text()
        assert "    trainer.train()\n" in text
        script = tmp_path / "child.py"
        script.write_text(text.replace("    trainer.train()\n", "".join(f"    {line}\n" for line in _CHILD.strip().splitlines())))
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        ddp_cleanup(trainer, file)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"cls": "trainer.ultralytics.ShardsTrainer", "loader": "torch", "train": "train2017",
                   "val": "train2017", "nc": 80}


def test_data_at_a_url(shards: Path, tmp_path: Path) -> None:
    """data=http://...: classes, splits and labels come from the remote manifest and labels.npz, batches stream."""
    with http_files(shards.parent) as base:
        cls = ShardsTrainer.options(cache_dir=str(tmp_path / "cache"))  # DALI/tfrecord fetches shards there
        trainer = cls(overrides={"model": "yolov8n.yaml", "data": f"{base}/{shards.name}", "device": "cpu",
                                 "imgsz": 160, "project": str(tmp_path), "name": "url"})
        assert (trainer.data["train"], trainer.data["nc"]) == ("train2017", 80)
        loader = trainer.get_dataloader(trainer.data["train"], batch_size=8, mode="train")
        try:
            batch = next(iter(loader))
        finally:
            loader.close()
        assert tuple(batch["img"].shape) == (8, 3, 160, 160) and len(loader) == 16
        assert any((tmp_path / "cache").rglob("*.tfrecord")), "shards were not cached where asked"
        assert trainer.get_class_counts().sum() == read_manifest(shards).splits["train2017"].num_boxes


def test_bad_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="manifest"):
        ShardsTrainer(overrides={"model": "yolov8n.yaml", "data": str(tmp_path), "device": "cpu",
                                 "project": str(tmp_path), "name": "bad"})
    with pytest.raises(ValueError, match="credentials") as e:
        ShardsTrainer(overrides={"model": "yolov8n.yaml", "data": "s3://user:s3cret-pw@bucket/x", "device": "cpu",
                                 "project": str(tmp_path), "name": "bad2"})
    assert "s3cret-pw" not in str(e.value)
    assert not (tmp_path / "bad2").exists(), "ultralytics wrote args.yaml with the URL before the check"
    with pytest.raises(TypeError, match="unknown"):
        ShardsTrainer.options(lodaer="torch")


def test_torchrun_on_cpu_is_refused(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ultralytics does not form a DDP group on CPU: two torchrun processes would each train on everything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="trainer.run"):
        ShardsTrainer(overrides={"model": "yolov8n.yaml", "data": str(shards), "device": "cpu",
                                 "project": str(tmp_path), "name": "tr"})


def test_importing_the_plugin_leaves_the_users_ultralytics_alone(tmp_path: Path) -> None:
    """It set YOLO_VERBOSE=false (all of ultralytics' console output, warnings included, vanished) and moved
    YOLO_CONFIG_DIR (the user's settings, runs and weights folders stopped applying)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_VERBOSE", "YOLO_CONFIG_DIR")}
    env["HOME"] = str(tmp_path)
    code = ("import os, trainer.ultralytics; from ultralytics.utils import USER_CONFIG_DIR, VERBOSE; "
            "print(os.environ.get('YOLO_VERBOSE'), os.environ.get('YOLO_CONFIG_DIR'), VERBOSE, USER_CONFIG_DIR, "
            "os.environ['YOLO_OFFLINE'], (USER_CONFIG_DIR / 'Arial.ttf').is_file())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1].split() == ["None", "None", "True", str(tmp_path / ".config" / "Ultralytics"), "true", "True"]
