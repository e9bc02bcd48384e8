"""TensorBoard logging into the run folder: every results.csv column as a scalar, the train_batch pictures.

On by default when the `tensorboard` package is installed, as in ultralytics; ``tensorboard --logdir runs``
shows every run. Only rank 0 writes (torch's own `SummaryWriter`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import cv2

from trainer.config import TrainError


def tensorboard_installed() -> bool:
    """Whether the `tensorboard` package can be imported (without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def resolve_tensorboard(wanted: bool | None) -> bool:
    """--tensorboard/--no-tensorboard/unset (None = on when installed); TrainError when asked for but missing."""
    if wanted is None:
        return tensorboard_installed()
    if wanted and not tensorboard_installed():
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard (or --no-tensorboard)")
    return bool(wanted)


class TensorBoardLog:
    """An event file in `out`, or nothing when `enabled` is False."""

    def __init__(self, out: Path, *, enabled: bool) -> None:
        self.writer: Any = None
        if enabled:
            # tensorboard's own switch to its TF-free stub (what its no_tensorflow build target does): where
            # TensorFlow is installed, importing it here cost ~5 s at start, printed its warnings, and its threads
            # could abort a finished DDP process at exit ("terminate called without an active exception")
            sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out))

    def scalars(self, row: dict[str, Any], step: int) -> None:
        """Every numeric column of one results.csv row (the epoch column is the step)."""
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def images(self, paths: list[Path], step: int) -> None:
        """Pictures already drawn into the run folder (train_batch*.jpg), tagged by file stem."""
        if self.writer is None:
            return
        for p in paths:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is not None:
                self.writer.add_image(p.stem, img[:, :, ::-1].copy(), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
