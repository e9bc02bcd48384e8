"""The run folder's pictures, drawn by ultralytics' own plotting functions (no plotting code here).

| file | when |
|---|---|
| ``labels.jpg`` | at start, from the train split's label arrays (`plot_labels`) |
| ``train_batch0..2.jpg`` | the first three batches of the first epoch, as the model sees them (`plot_images`) |
| ``results.png`` | after every epoch, from results.csv (`plot_results`) |
| ``val_batch0_labels.jpg``, ``val_batch0_pred.jpg`` | final validation of the best weights (`plot_images`) |
| ``confusion_matrix*.png``, ``Box{PR,F1,P,R}_curve.png`` | the same validation (`ConfusionMatrix`, `DetMetrics`) |

Only rank 0 draws. Each picture is drawn into a staging folder inside the run folder and moved into
place with `os.replace`, so a reader never sees half a file. A picture that fails to draw costs one
warning, never the run. Train batches are drawn on a background thread, off the step loop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from ultralytics.utils.metrics import ConfusionMatrix, DetMetrics
from ultralytics.utils.ops import xywh2xyxy, xyxy2xywh
from ultralytics.utils.plotting import plot_images, plot_labels, plot_results

TRAIN_BATCH_PLOTS = 3  # ultralytics draws iterations 0, 1 and 2 of the first epoch
_PICTURES = (".jpg", ".png")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A scratch folder inside `out`; the pictures left in it move into `out` atomically on success."""
    tmp = Path(tempfile.mkdtemp(prefix=".plots-", dir=out))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.suffix in _PICTURES:
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class RunPlots:
    """The pictures of one run; every method is a no-op when `enabled` is False (plots off, rank > 0)."""

    def __init__(self, out: Path, names: list[str], *, enabled: bool, log: Callable[[str], None]) -> None:
        self.out, self.enabled, self._log = out, enabled, log
        self.names = dict(enumerate(names))
        self._threads: list[threading.Thread] = []

    def _guarded(self, what: str, fn: Callable[[Path], None]) -> None:
        if not self.enabled:
            return
        try:
            with staged(self.out) as tmp:
                fn(tmp)
        except Exception as e:  # a picture is a by-product: it never stops training
            self._log(f"warning: could not draw {what}: {type(e).__name__}: {e}")

    def labels(self, cls: np.ndarray, boxes: np.ndarray) -> None:
        """labels.jpg: class histogram and box position/size distributions of the train split."""
        if len(cls):
            self._guarded("labels.jpg", lambda d: plot_labels(np.asarray(boxes, np.float32), np.asarray(cls),
                                                              names=self.names, save_dir=d))

    def train_batch(self, ni: int, batch: dict[str, Any]) -> None:
        """train_batch{ni}.jpg for the first iterations, drawn on a thread (the batch is copied first)."""
        if not self.enabled or ni >= TRAIN_BATCH_PLOTS:
            return
        b = _cpu({k: batch[k] for k in ("img", "cls", "bboxes", "batch_idx", "im_file") if k in batch})
        name = f"train_batch{ni}.jpg"
        t = threading.Thread(target=self._guarded, daemon=True, args=(name, lambda d: plot_images(
            labels=b, paths=b.get("im_file"), fname=d / name, names=self.names, threaded=False)))
        t.start()
        self._threads.append(t)

    def wait(self) -> list[Path]:
        """Wait for the train-batch threads; the train_batch pictures now on disk."""
        for t in self._threads:
            t.join()
        self._threads = []
        return sorted(self.out.glob("train_batch*.jpg")) if self.enabled else []

    def results(self, csv_path: Path) -> None:
        """results.png from results.csv (ultralytics plots the loss and metric columns, ignores the rest)."""
        def draw(d: Path) -> None:
            shutil.copy(csv_path, d / "results.csv")
            plot_results(file=d / "results.csv")

        if csv_path.exists():
            self._guarded("results.png", draw)

    def validation(self, evaluator: Any, confusion: ConfusionMatrix, first: tuple[dict, list] | None) -> None:
        """val_batch0_labels/pred.jpg, the two confusion matrices and the four Box*_curve.png of a validation."""
        if first is not None:
            batch, dets = first
            self._guarded("val_batch0_labels.jpg", lambda d: plot_images(
                labels=batch, paths=batch.get("im_file"), fname=d / "val_batch0_labels.jpg", names=self.names,
                threaded=False))
            self._guarded("val_batch0_pred.jpg", lambda d: plot_images(
                labels=_pred_labels(dets), images=batch["img"], paths=batch.get("im_file"),
                fname=d / "val_batch0_pred.jpg", names=self.names, threaded=False))
        self._guarded("confusion_matrix.png", lambda d: [confusion.plot(normalize=n, save_dir=d) for n in (True, False)])
        if evaluator.stats:
            self._guarded("Box*_curve.png", lambda d: det_metrics(evaluator.stats, self.names).process(d, plot=True))


def _pred_labels(dets: list[torch.Tensor], max_det: int = 300) -> dict[str, torch.Tensor]:
    """The label dict plot_images draws predictions from (xywh pixels, conf, cls, batch_idx), as ultralytics builds it."""
    dets = [d[:max_det].float() for d in dets] or [torch.zeros(0, 6)]
    cat = torch.cat(dets, 0)
    return {"bboxes": xyxy2xywh(cat[:, :4]), "conf": cat[:, 4], "cls": cat[:, 5],
            "batch_idx": torch.cat([torch.full((len(d),), float(i)) for i, d in enumerate(dets)])}


def det_metrics(stats: list[tuple[np.ndarray, ...]], names: dict[int, str]) -> DetMetrics:
    """ultralytics' DetMetrics filled from the Evaluator's per-image (tp, conf, pred_cls, target_cls)."""
    m = DetMetrics(names=names)
    for i, (tp, conf, pred_cls, target_cls) in enumerate(stats):
        m.update_stats({"tp": tp, "conf": conf, "pred_cls": pred_cls, "target_cls": target_cls,
                        "target_img": np.unique(target_cls), "im_name": str(i)})
    return m


class ValObserver:
    """Collects what the final validation's pictures need: the confusion matrix (summed over ranks) and,
    on rank 0, the first batch with its detections."""

    def __init__(self, names: list[str]) -> None:
        self.confusion = ConfusionMatrix(names=dict(enumerate(names)), task="detect")
        self.first: tuple[dict, list] | None = None

    def __call__(self, bi: int, batch: dict[str, Any], dets: list[torch.Tensor]) -> None:
        """One validation batch (images as the model saw them, `dets` from NMS in input pixels)."""
        b = _cpu(batch)
        if bi == 0:
            self.first = (b, [d.detach().cpu() for d in dets])
        h, w = b["img"].shape[2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        valid = b.get("valid")
        for si, det in enumerate(dets):
            if valid is not None and not bool(valid[si]):
                continue
            sel = b["batch_idx"] == si
            gt = {"cls": b["cls"][sel].reshape(-1), "bboxes": xywh2xyxy(b["bboxes"][sel].float()) * scale}
            det = det.detach().cpu().float()
            self.confusion.process_batch({"bboxes": det[:, :4], "conf": det[:, 4], "cls": det[:, 5]}, gt)

    def gather(self, device: torch.device) -> None:
        """Sum the confusion matrix over the ranks (a collective: every rank calls it)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.as_tensor(self.confusion.matrix, dtype=torch.float64, device=device)
            dist.all_reduce(t)
            self.confusion.matrix = t.cpu().numpy()
