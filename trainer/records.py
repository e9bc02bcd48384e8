"""What a run leaves on disk: the run folder, args.yaml, results.csv and the checkpoints.

The layout is ultralytics' (``runs/train``, ``runs/train2``, ... with ``weights/last.pt`` and
``weights/best.pt``); every file is replaced atomically, so a kill at any moment leaves the previous
complete version. Only rank 0 writes.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ultralytics.utils.files import increment_path

from packer.format import atomic_write_bytes
from trainer.config import TrainError
from trainer.model import save_checkpoint, strip_checkpoint


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    out: Path
    last: Path
    best: Path | None
    epochs_done: int  # completed epochs, counting those before a resume
    metrics: dict[str, float] = field(default_factory=dict)
    best_fitness: float | None = None
    interrupted: bool = False
    steps: int = 0  # optimizer-loop iterations this process ran (equal on every rank)


def run_dir(out: str | os.PathLike, exist_ok: bool) -> Path:
    """ultralytics' run-folder rule (its own `increment_path`): reuse with exist_ok, else
    runs/train -> runs/train2, train3, ..."""
    path = increment_path(Path(out), exist_ok=exist_ok, sep="")
    if path.exists() and not exist_ok:
        raise TrainError(f"no free run directory next to {out}")
    return path


class RunRecords:
    """The files of one run folder; `main` is False on ranks > 0, which then write nothing."""

    def __init__(self, out: Path, *, main: bool, resume: bool) -> None:
        self.out = out
        self.main = main
        self.wdir = out / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        self.csv = out / "results.csv"
        if main:
            self.wdir.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.csv.unlink(missing_ok=True)  # --exist-ok reuses the folder, not the old run's rows

    def write_args(self, args: dict[str, Any]) -> None:
        """args.yaml: every option of the run, as resolved (credentials already masked by the caller)."""
        if self.main:
            atomic_write_bytes(self.out / "args.yaml", yaml.safe_dump(args, sort_keys=False).encode())

    def trim_csv(self, start_epoch: int) -> None:
        """On resume, drop rows of epochs that will be trained again (a kill after the row, before last.pt)."""
        if not (self.main and self.csv.exists()):
            return
        with open(self.csv, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= start_epoch]
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        os.replace(tmp, self.csv)

    def append_csv(self, row: dict[str, Any]) -> None:
        """One results.csv row per epoch (the header with the first row), ultralytics' columns."""
        if not self.main:
            return
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(list(row))
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])

    def save(self, paths: list[Path], ema_model: Any, **state: Any) -> None:
        """Checkpoint to `paths` (last.pt, and best.pt when the epoch is the best): see `model.save_checkpoint`."""
        if self.main:
            save_checkpoint(paths, ema_model, **state)

    def finish(self, interrupted: bool) -> Path | None:
        """best.pt without the resume state (for inference/export; last.pt keeps it); its path if it exists.

        ultralytics' `strip_optimizer` does not fit here: it writes in place (not atomically), moves the
        EMA to "model", resets epoch/best_fitness and drops our train_args keys, and keeps our RNG state.
        """
        if self.main and not interrupted and self.best.exists():
            strip_checkpoint(self.best)
        return self.best if self.best.exists() else None
