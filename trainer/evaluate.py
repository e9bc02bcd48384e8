"""Detection metrics with ultralytics' own functions: NMS, greedy TP matching and ap_per_class.

The figures equal ``YOLO(...).val()``'s (REFERENCE §2.5). Boxes are compared in original-image pixels:
predictions and ground truth, both in network-input pixels, are mapped back through the batch's
``ratio_pad`` = (gain_x, gain_y, pad_x, pad_y). Samples with ``valid == False`` (DDP padding) are ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import ap_per_class, box_iou
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import xywh2xyxy

from trainer.data.common import to_device

__all__ = ["IOUV", "METRIC_KEYS", "Evaluator", "to_original", "match_predictions", "run_validation"]

IOUV = torch.linspace(0.5, 0.95, 10)  # ultralytics' IoU thresholds for mAP50-95
METRIC_KEYS = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)")
_MATCHER = SimpleNamespace(iouv=IOUV)  # match_predictions only reads self.iouv


def to_original(boxes_xyxy: torch.Tensor, ratio_pad: torch.Tensor) -> torch.Tensor:
    """Map (N,4) xyxy boxes from network-input pixels to original-image pixels (no clipping, like val's matching)."""
    gx, gy, px, py = (float(v) for v in ratio_pad)
    out = boxes_xyxy.clone().float()
    out[:, [0, 2]] = (out[:, [0, 2]] - px) / gx
    out[:, [1, 3]] = (out[:, [1, 3]] - py) / gy
    return out


def match_predictions(det: torch.Tensor, gt_boxes: torch.Tensor, gt_cls: torch.Tensor) -> np.ndarray:
    """(D,10) bool TP matrix for detections `det` (D,6: xyxy, conf, cls; confidence-sorted) against ground truth."""
    if len(det) == 0 or len(gt_cls) == 0:
        return np.zeros((len(det), len(IOUV)), dtype=bool)
    iou = box_iou(gt_boxes.float(), det[:, :4].float())
    return BaseValidator.match_predictions(_MATCHER, det[:, 5], gt_cls.float(), iou).cpu().numpy()


@dataclass
class Evaluator:
    """Accumulates per-image matching statistics; `compute()` turns them into P, R, mAP50, mAP50-95."""

    nc: int
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    seen: int = 0

    def reset(self) -> None:
        self.stats = []
        self.seen = 0

    def nms(self, preds: Any) -> list[torch.Tensor]:
        """ultralytics' NMS exactly as DetectionValidator calls it (multi-label, conf 0.001, IoU 0.7)."""
        if isinstance(preds, (list, tuple)):
            preds = preds[0]  # eval-mode head: (decoded predictions, raw feature maps)
        # fp32 for NMS whatever the autocast dtype was (bf16 boxes lose pixels at 640)
        return non_max_suppression(preds.float(), self.conf, self.iou, multi_label=True, max_det=self.max_det)

    def update(self, dets: list[torch.Tensor], batch: dict[str, Any]) -> None:
        """Add one batch: `dets` from `nms()`, `batch` in the loader's batch-dict form."""
        h, w = batch["img"].shape[2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        bidx = batch["batch_idx"].detach().cpu().long()
        cls_all = batch["cls"].detach().cpu().reshape(-1)
        boxes_all = batch["bboxes"].detach().cpu().float().reshape(-1, 4)
        valid = batch.get("valid")
        valid = torch.ones(len(dets), dtype=torch.bool) if valid is None else valid.detach().cpu().bool()
        ratio_pad = batch["ratio_pad"].detach().cpu().float()
        for si, det in enumerate(dets):
            if not bool(valid[si]):
                continue  # padding/duplicate sample added for equal per-rank batch counts
            self.seen += 1
            sel = bidx == si
            gt_cls = cls_all[sel]
            gt = to_original(xywh2xyxy(boxes_all[sel]) * scale, ratio_pad[si])
            det = det.detach().cpu().float()
            pred = to_original(det[:, :4], ratio_pad[si])
            tp = match_predictions(torch.cat([pred, det[:, 4:6]], 1), gt, gt_cls)
            self.stats.append((tp, det[:, 4].numpy(), det[:, 5].numpy(), gt_cls.numpy()))

    def gather(self) -> None:
        """Under DDP, move every rank's statistics to every rank (call on all ranks)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.stats, self.seen))
            self.stats = [s for st, _ in parts for s in st]
            self.seen = sum(n for _, n in parts)

    def compute(self) -> dict[str, float]:
        """P, R, mAP50, mAP50-95 (ultralytics' definitions, keys as in results.csv) plus per-class AP arrays."""
        out = dict.fromkeys(METRIC_KEYS, 0.0)
        if not self.stats:
            return out
        tp = np.concatenate([s[0] for s in self.stats], 0)
        conf = np.concatenate([s[1] for s in self.stats], 0)
        pred_cls = np.concatenate([s[2] for s in self.stats], 0)
        target_cls = np.concatenate([s[3] for s in self.stats], 0)
        if len(target_cls) == 0:
            return out
        _, _, p, r, _, ap, *_ = ap_per_class(tp, conf, pred_cls, target_cls)
        out.update({
            "metrics/precision(B)": float(p.mean()) if len(p) else 0.0,
            "metrics/recall(B)": float(r.mean()) if len(r) else 0.0,
            "metrics/mAP50(B)": float(ap[:, 0].mean()) if len(ap) else 0.0,
            "metrics/mAP50-95(B)": float(ap.mean()) if len(ap) else 0.0,
        })
        return out

    def num_targets(self) -> int:
        return int(sum(len(s[3]) for s in self.stats))


@torch.no_grad()
def run_validation(
    model: torch.nn.Module,
    loader: Any,
    evaluator: Evaluator,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    with_loss: bool = True,
    on_batch: Callable[[int, dict[str, Any], list[torch.Tensor]], None] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate `model` (the EMA) over one pass of `loader` on this rank, gather across ranks.

    Returns (metrics, mean val loss items). Call on every rank: the gather is collective. `on_batch(i, batch,
    detections)` sees each batch (images scaled to [0, 1]) with its NMS output, in network-input pixels.
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    loss_sum: dict[str, torch.Tensor] = {}
    n = 0
    ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    for bi, batch in enumerate(loader):
        batch = to_device(batch, device, non_blocking=True)
        batch["img"] = batch["img"].float() / 255
        with ctx:
            preds = model(batch["img"])
            if with_loss:
                items = model.loss(batch, preds)[1]
                for k, v in items.items():
                    loss_sum[k] = loss_sum.get(k, 0) + v.detach().float()
        n += 1
        dets = evaluator.nms(preds)
        if on_batch is not None:
            on_batch(bi, batch, dets)
        evaluator.update(dets, batch)
    evaluator.gather()
    losses = {k: float(v) / max(n, 1) for k, v in loss_sum.items()}
    if with_loss and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        keys = sorted(losses)
        t = torch.tensor([losses[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        losses = dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))
    if was_training:
        model.train()
    return evaluator.compute(), losses
