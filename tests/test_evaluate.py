"""trainer.evaluate: hand-checkable matching/mAP cases, and agreement with ultralytics' YOLO.val()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluate import METRIC_KEYS, Evaluator, match_predictions, to_original


def test_to_original_inverts_letterbox_per_axis():
    # network x = x0 * 0.5 + 10, y = y0 * 0.25 + 20
    out = to_original(torch.tensor([[20.0, 30.0, 60.0, 70.0]]), torch.tensor([0.5, 0.25, 10.0, 20.0]))
    assert out.tolist() == [[20.0, 40.0, 100.0, 200.0]]


def test_match_predictions_greedy_by_confidence_and_class():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt_cls = torch.tensor([0.0])
    det = torch.tensor([
        [0.0, 0.0, 10.0, 10.0, 0.9, 0.0],  # IoU 1: the match
        [0.0, 0.0, 10.0, 6.0, 0.8, 0.0],  # IoU 0.6, but the target is already claimed
        [0.0, 0.0, 10.0, 10.0, 0.7, 1.0],  # wrong class
    ])
    tp = match_predictions(det, gt, gt_cls)
    assert tp.shape == (3, 10)
    assert tp[0].all() and not tp[1].any() and not tp[2].any()


def test_match_predictions_iou_thresholds():
    # IoU 0.72: true positive at 0.50, 0.55, 0.60, 0.65, 0.70 only
    tp = match_predictions(torch.tensor([[0.0, 0.0, 10.0, 7.2, 0.9, 0.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                           torch.tensor([0.0]))
    assert tp[0].tolist() == [True] * 5 + [False] * 5


def _batch(valid=(True, True)) -> dict:
    """Two 64x64 network inputs: image 0 from a 256x128 (w x h) original (gain 0.25, pad_y 16),
    image 1 from a 64x64 original (gain 1, no pad)."""
    return {
        "img": torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
        "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [1.0]]),
        # normalized cx, cy, w, h in the 64x64 input
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.25, 0.25], [0.75, 0.75, 0.25, 0.25]]),
        "ratio_pad": torch.tensor([[0.25, 0.25, 0.0, 16.0], [1.0, 1.0, 0.0, 0.0]]),
        "valid": torch.tensor(valid),
        "ori_shape": [(128, 256), (64, 64)],
    }


def test_evaluator_perfect_and_half_recall():
    ev = Evaluator(nc=2)
    # network-pixel xyxy: image 0's box is (16, 24, 48, 40); image 1 finds one of its two boxes
    dets = [torch.tensor([[16.0, 24.0, 48.0, 40.0, 0.9, 0.0]]), torch.tensor([[8.0, 8.0, 24.0, 24.0, 0.8, 1.0]])]
    ev.update(dets, _batch())
    m = ev.compute()
    assert ev.seen == 2 and ev.num_targets() == 3
    # class 0: 1/1 found -> AP 0.995 (101-point interpolation); class 1: 1/2 found -> AP 0.495
    assert m["metrics/mAP50(B)"] == pytest.approx((0.995 + 0.495) / 2)
    assert m["metrics/mAP50-95(B)"] == pytest.approx((0.995 + 0.495) / 2)
    assert set(m) == set(METRIC_KEYS)


def test_evaluator_ignores_invalid_samples():
    ev = Evaluator(nc=2)
    dets = [torch.tensor([[16.0, 24.0, 48.0, 40.0, 0.9, 0.0]]), torch.zeros(0, 6)]
    ev.update(dets, _batch(valid=(True, False)))  # image 1 (two boxes, nothing found) is padding
    assert ev.seen == 1 and ev.num_targets() == 1
    assert ev.compute()["metrics/mAP50-95(B)"] == pytest.approx(0.995)


def test_evaluator_boxes_compared_in_original_pixels():
    # anisotropic gains: a box that is a perfect match in original pixels stays one after the mapping
    ev = Evaluator(nc=1)
    batch = {
        "img": torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "batch_idx": torch.tensor([0.0]),
        "cls": torch.tensor([[0.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
        "ratio_pad": torch.tensor([[0.5, 0.4, 2.0, 3.0]]), "valid": torch.tensor([True]),
    }
    ev.update([torch.tensor([[16.0, 16.0, 48.0, 48.0, 0.5, 0.0]])], batch)
    tp = ev.stats[0][0]
    assert tp.all()


def test_nms_wrapper_keeps_confident_box():
    ev = Evaluator(nc=2)
    # raw head output (B, 4 + nc, anchors): xywh + class scores
    preds = torch.zeros(1, 6, 3)
    preds[0, :4, 0] = torch.tensor([32.0, 32.0, 16.0, 16.0])
    preds[0, 5, 0] = 0.9
    out = ev.nms(preds)
    assert len(out) == 1 and out[0].shape == (1, 6)
    assert out[0][0, :4].tolist() == [24.0, 24.0, 40.0, 40.0] and out[0][0, 5].item() == 1.0
    assert np.isclose(out[0][0, 4].item(), 0.9)


def _recalibrate_bn(model: torch.nn.Module, loader) -> None:
    """Re-estimate BatchNorm statistics from `loader` (a short run leaves them far from the weights')."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for b in loader:
            model(b["img"].float() / 255)
    model.eval()


def _ultralytics_metrics_on(model, loader, save_dir) -> dict:
    """ultralytics' own DetectionValidator (NMS, matching in network pixels, DetMetrics) on our batches."""
    from ultralytics.models.yolo.detect import DetectionValidator

    v = DetectionValidator(save_dir=save_dir, args={"plots": False, "conf": 0.001, "iou": 0.7})
    v.training, v.data, v.device = True, {}, torch.device("cpu")  # training=True: no dataset checks
    v.init_metrics(model)
    with torch.no_grad():
        for b in loader:
            b = dict(b, img=b["img"].float() / 255)
            v.update_metrics(v.postprocess(model(b["img"])), b)
    return v.get_stats()


def test_map_agrees_with_ultralytics(tmp_path):
    """Same weights: (1) exactly ultralytics' validator on the same batches; (2) ultralytics' whole
    YOLO(...).val(rect=False) on the packed JPEGs (its own reading, letterbox and scaling back): within
    0.02. (Against the raw PNGs the packed copies' INTER_AREA pre-resize + JPEG q95 move a barely trained
    model on 4 val images by up to 0.07, too much for a check of geometry.)"""
    from _train_util import packed, synthetic_yolo
    from ultralytics import YOLO

    from trainer.config import AUGMENT_KEYS
    from trainer.data import make_loader
    from trainer.engine import TrainConfig, train
    from trainer.evaluate import run_validation
    from trainer.model import attach_hyp, load_resume_state, save_checkpoint

    src = synthetic_yolo()
    shards = packed(src, size=160)
    # augmentation off and 10 epochs: 12 images are then learned well enough by every seed tried
    # (mAP50 0.18-0.39 over seeds 0-3); with the default augmentation 8 epochs left seed 0 at 0.002
    no_aug = {k: 0.0 for k in AUGMENT_KEYS}
    r = train(TrainConfig(shards=str(shards), model="yolov8n.yaml", epochs=10, batch=4, nbs=4, imgsz=128,
                          optimizer="AdamW", lr0=0.002, warmup_epochs=1, out=str(tmp_path / "run"), device="cpu",
                          loader="torch", workers=0, **no_aug), log=lambda s: None)
    model = load_resume_state(r.last)["ema"].float()
    attach_hyp(model)
    _recalibrate_bn(model, make_loader(shards, "train", imgsz=128, batch=4, train=False, loader="torch", workers=0))

    def val_loader():
        return make_loader(shards, "val", imgsz=128, batch=2, train=False, loader="torch", workers=0)

    ours, _ = run_validation(model, val_loader(), Evaluator(nc=3), device=torch.device("cpu"), with_loss=False)
    same_batches = _ultralytics_metrics_on(model, val_loader(), tmp_path)
    pt = tmp_path / "recal.pt"
    save_checkpoint([pt], model, epoch=0, train_args={"imgsz": 128})
    # ultralytics' whole val pipeline (its reader, letterbox, NMS, scaling back to image pixels)
    # on the very JPEGs we packed, laid out as a YOLO folder: the same pixels reach both models,
    # so what differs is only our side's geometry (ratio_pad, boxes mapped to the original size)
    data = _packed_as_yolo_folder(shards, "val", tmp_path / "packed-yolo")
    theirs = YOLO(str(pt)).val(data=str(data), imgsz=128, batch=4, rect=False, plots=False,
                               verbose=False, device="cpu", project=str(tmp_path), name="val").results_dict
    # a model that finds things, or the comparison means nothing
    assert theirs["metrics/mAP50(B)"] > 0.05
    for k in METRIC_KEYS[2:]:
        assert ours[k] == pytest.approx(same_batches[k], abs=1e-3), k
        assert ours[k] == pytest.approx(theirs[k], abs=0.02), k


def _packed_as_yolo_folder(shards, split: str, root):  # noqa: ANN001, ANN202
    """The packed JPEGs of `split` and their labels (normalized, so valid at the stored size) as a YOLO set."""
    from packer.format import read_manifest
    from packer.writers import open_reader

    m = read_manifest(shards)
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for sh in m.splits[split].shards:
        with open_reader(m.format, shards / sh.path) as reader:
            for rec in reader:
                (root / "images" / split / f"{rec.key}.jpg").write_bytes(rec.jpeg)
                lines = [f"{c} " + " ".join(f"{v:.6f}" for v in b) for c, b in zip(rec.cls, rec.boxes, strict=True)]
                (root / "labels" / split / f"{rec.key}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(m.names))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/{split}\nval: images/{split}\nnames:\n{names}")
    return root / "data.yaml"
