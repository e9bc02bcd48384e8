"""Test helpers for the training job: a tiny synthetic detection set and a stand-in loader.

The stand-in follows the `make_loader` contract exactly (batch dict, len, set_epoch, set_mosaic, valid mask,
rank split) so engine/evaluate tests do not depend on the real data path; the end-to-end tests use the
real `trainer.data.make_loader` on packed shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from packer.format import LabelArrays, Manifest, ShardInfo, SplitInfo, make_key, write_manifest

NAMES = ["red", "green", "blue"]
COLORS = [(220, 40, 40), (40, 200, 40), (40, 60, 230)]  # RGB


def make_yolo_set(root: Path, n_train: int = 12, n_val: int = 4, seed: int = 0) -> Path:
    """Coloured rectangles on noisy grey, YOLO layout (images/<split>, labels/<split>, data.yaml)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.choice([120, 160, 200])), int(rng.choice([160, 200, 240]))
            # smooth background (a colour gradient, light noise): JPEG and resize kernels barely change it,
            # so packed and raw images give nearly the same predictions
            gy, gx = np.mgrid[0:h, 0:w] / max(h, w)
            base = rng.uniform(80, 160, 3) + 40 * (gx[..., None] * rng.uniform(-1, 1, 3) + gy[..., None] * rng.uniform(-1, 1, 3))
            img = np.clip(base + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                c = int(rng.integers(0, 3))
                bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
                x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                img[y0:y0 + bh, x0:x0 + bw] = COLORS[c]
                lines.append(f"{c} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{split}{i:03d}.png"), img[:, :, ::-1])
            (root / "labels" / split / f"{split}{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES))
    )
    return root


def fake_pack(yolo_root: Path, out: Path) -> Path:
    """A manifest + labels.npz over the raw images (no shards): enough for the stand-in loader."""
    splits = {}
    for split in ("train", "val"):
        rows = []
        from packer.format import Record

        for p in sorted((yolo_root / "images" / split).glob("*.png")):
            lab = np.loadtxt(yolo_root / "labels" / split / f"{p.stem}.txt", ndmin=2)
            h, w = cv2.imread(str(p)).shape[:2]
            src = str(p.relative_to(yolo_root))
            rows.append((Record(make_key(src), src, b"", h, w, h, w, lab[:, 0], lab[:, 1:5]), 0, len(rows)))
        la = LabelArrays.from_records(rows)
        (out / split).mkdir(parents=True, exist_ok=True)
        la.save(out / split / "labels.npz")
        counts = np.bincount(la.cls, minlength=len(NAMES)).tolist()
        splits[split] = SplitInfo(len(la), int(len(la.cls)), counts, f"{split}/labels.npz",
                                  [ShardInfo(f"{split}/{split}-00000.tfrecord", len(la), 0, "0" * 64,
                                             f"{split}/{split}-00000.tfrecord.idx")])  # no files: never read
    m = Manifest("tfrecord", 10_000, NAMES, {"path": str(yolo_root), "layout": "yolo-yaml"}, {}, "test", splits)
    write_manifest(out, m)
    return out


class StandInLoader:
    """Contract-exact loader over `fake_pack` output (reads the raw images; letterbox, flip)."""

    def __init__(self, shards: str | Path, split: str, *, loader: str = "auto", imgsz: int = 640, batch: int = 16,
                 train: bool = True, rank: int = 0, world_size: int = 1, seed: int = 0, workers: int | None = None,
                 device: Any = "auto", augment: Any = None, verify: bool = False) -> None:
        from packer.format import read_manifest

        m = read_manifest(shards)
        self.root = Path(m.source["path"])
        self.la = LabelArrays.load(Path(shards) / m.splits[split].labels)
        self.names, self.num_samples, self.kind = list(m.names), len(self.la), "torch"
        self.imgsz, self.batch, self.train = imgsz, batch, train
        self.rank, self.world, self.seed, self.epoch = rank, world_size, seed, 0
        self.device = torch.device("cpu") if device in ("auto", None) else torch.device(device)
        self.per_rank = math.ceil(self.num_samples / world_size)
        self.stats = {"corrupt_skipped": 0}
        self.mosaic = True
        self.batches_yielded = 0

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_mosaic(self, enabled: bool) -> None:
        self.mosaic = enabled

    def close(self) -> None:
        pass

    def _indices(self) -> tuple[list[int], list[bool]]:
        order = np.arange(self.num_samples)
        if self.train:
            order = np.random.default_rng(self.seed + self.epoch).permutation(self.num_samples)
        total = self.per_rank * self.world
        padded = np.concatenate([order, order[: total - self.num_samples]])
        valid = np.arange(total) < self.num_samples
        mine = list(range(self.rank, total, self.world))
        idx, ok = [int(padded[i]) for i in mine], [bool(valid[i]) for i in mine]
        while len(idx) < len(self) * self.batch:  # fill the last batch
            idx.append(idx[-1])
            ok.append(False)
        return idx, ok

    def __iter__(self):
        idx, ok = self._indices()
        rng = np.random.default_rng(self.seed * 1000 + self.epoch * 10 + self.rank)
        s = self.imgsz
        for b in range(len(self)):
            imgs, bi, cl, bx, rp, keys, files, shapes = [], [], [], [], [], [], [], []
            for j, i in enumerate(idx[b * self.batch:(b + 1) * self.batch]):
                img = cv2.imread(str(self.root / self.la.sources[i]))[:, :, ::-1]
                h0, w0 = img.shape[:2]
                r = min(s / h0, s / w0)
                nw, nh = round(w0 * r), round(h0 * r)
                img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
                px, py = (s - nw) / 2, (s - nh) / 2
                canvas = np.full((s, s, 3), 114, np.uint8)
                top, left = round(py - 0.1), round(px - 0.1)
                canvas[top:top + nh, left:left + nw] = img
                c, bb = self.la.labels(i)
                bb = bb.copy()
                bb[:, 0] = (bb[:, 0] * nw + left) / s
                bb[:, 1] = (bb[:, 1] * nh + top) / s
                bb[:, 2] *= nw / s
                bb[:, 3] *= nh / s
                if self.train and rng.random() < 0.5:
                    canvas = canvas[:, ::-1]
                    bb[:, 0] = 1 - bb[:, 0]
                imgs.append(torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1))
                bi += [j] * len(c)
                cl.append(c)
                bx.append(bb)
                rp.append((nw / w0, nh / h0, left, top))
                keys.append(str(self.la.keys[i]))
                files.append(str(self.la.sources[i]))
                shapes.append((h0, w0))
            self.batches_yielded += 1
            yield {
                "img": torch.stack(imgs).to(self.device),
                "batch_idx": torch.tensor(bi, dtype=torch.float32, device=self.device),
                "cls": torch.from_numpy(np.concatenate(cl).astype(np.float32)).reshape(-1, 1).to(self.device),
                "bboxes": torch.from_numpy(np.concatenate(bx).astype(np.float32)).reshape(-1, 4).to(self.device),
                "keys": keys, "im_file": files, "ori_shape": shapes,
                "ratio_pad": torch.tensor(rp, dtype=torch.float32, device=self.device),
                "valid": torch.tensor(ok[b * self.batch:(b + 1) * self.batch], dtype=torch.bool, device=self.device),
            }


ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python"
_PACKED: dict[tuple, Path] = {}


def _session_tmp(prefix: str) -> str:
    """A temp folder removed when the test session's interpreter exits."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def packed(src: str | Path, size: int = 160, fmt: str = "tfrecord") -> Path:
    """Pack `src` once per test session (real packer) into a temp folder; returns the shards folder."""
    from packer.build import build_dataset

    key = (str(src), size, fmt)
    if key not in _PACKED:
        out = Path(_session_tmp("h4-packed-")) / "shards"
        build_dataset(src, out, fmt=fmt, size=size, workers=1, overwrite=True, progress=False)
        _PACKED[key] = out
    return _PACKED[key]


def synthetic_yolo() -> Path:
    """The synthetic YOLO set (12 train / 4 val PNGs, 3 classes), made once per session."""
    if "synthetic" not in _PACKED:
        _PACKED["synthetic"] = make_yolo_set(Path(_session_tmp("h4-synth-")) / "yolo")
    return _PACKED["synthetic"]


def train_cmd(shards: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    """A small CPU `python -m trainer.run` command line for tests."""
    return [PY, "-m", "trainer.run", str(shards), "--epochs", str(epochs), "--imgsz", "128", "--batch", "4",
            "--model", "yolov8n.yaml", "--out", str(out), "--device", "cpu", *extra]


def subprocess_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
