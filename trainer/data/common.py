"""What both loader families share: opening a packed split, checksums, the batch form."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from packer.format import FormatError, LabelArrays, Manifest, SplitInfo, read_manifest, sha256_file
from trainer.data.transforms import letterbox_geometry

log = logging.getLogger("trainer.data")


class DataError(FormatError):
    """The packed data cannot be loaded as asked (missing split, corrupt shard, ...); a ValueError."""


@dataclass
class SplitData:
    """A split of a packed dataset, opened from its manifest and cached label arrays."""

    root: Path
    manifest: Manifest
    name: str
    info: SplitInfo
    labels: LabelArrays
    key_index: dict[str, int] = field(repr=False)

    @property
    def fmt(self) -> str:
        return self.manifest.format

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.info.shards]

    def shard_path(self, i: int) -> Path:
        return self.root / self.info.shards[i].path

    def index_path(self, i: int) -> Path:
        idx = self.info.shards[i].index
        if idx is None:
            raise DataError(f"shard {self.info.shards[i].path} has no index file in the manifest")
        return self.root / idx


def open_split(shards: str | Path, split: str, *, verify: bool = False) -> SplitData:
    """Read the manifest and `<split>/labels.npz`; with `verify`, check every shard's sha256.

    Never scans shards to count: all counts come from the manifest.
    """
    root = Path(shards)
    try:
        manifest = read_manifest(root)
    except FormatError as e:
        raise DataError(str(e)) from None
    split = resolve_split(manifest, split)
    if split not in manifest.splits:
        have = ", ".join(sorted(manifest.splits)) or "none"
        raise DataError(f"{root}: no split {split!r} in the manifest (splits: {have})")
    info = manifest.splits[split]
    try:
        labels = LabelArrays.load(root / info.labels)
    except (FormatError, FileNotFoundError) as e:
        raise DataError(f"{root / info.labels}: {e}") from None
    if len(labels) != info.num_samples:
        raise DataError(f"{root / info.labels}: {len(labels)} samples but the manifest says {info.num_samples}")
    for sh in info.shards:
        for p in [sh.path] + ([sh.index] if sh.index else []):
            if not (root / p).exists():
                raise DataError(f"{root / p}: listed in the manifest but missing")
    if verify:
        for sh in info.shards:
            path = root / sh.path
            digest = _sha256(path)
            if digest != sh.sha256:
                raise DataError(
                    f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest says {sh.sha256[:12]}...): "
                    "the shard is corrupt or was changed after packing; re-pack it or run without verify"
                )
    key_index = {str(k): i for i, k in enumerate(labels.keys.tolist())}
    return SplitData(root, manifest, split, info, labels, key_index)


def resolve_split(manifest: Manifest, split: str) -> str:
    """`split` itself, or the one split whose name starts with it ("train" -> "train2017")."""
    if split in manifest.splits:
        return split
    matches = [s for s in manifest.splits if s.startswith(split)]
    return matches[0] if len(matches) == 1 else split


def _sha256(path: Path) -> str:
    if path.is_dir():  # lmdb environment: hash of data.mdb (what the packer records)
        path = path / "data.mdb"
    return sha256_file(path)


def default_workers() -> int:
    """CPUs per process on this node (LOCAL_WORLD_SIZE processes share them), at most 8."""
    import os

    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min((os.cpu_count() or 1) // local, 8))


def default_device(device: str | torch.device, rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is available, else cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            import os

            local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device(device)


def ratio_pad(orig_hw: np.ndarray, hw: np.ndarray, imgsz: int) -> np.ndarray:
    """(B,4) float32 gain_x, gain_y, pad_x, pad_y mapping original pixels to network-input pixels."""
    out = np.zeros((len(hw), 4), dtype=np.float32)
    for i, ((h, w), (oh, ow)) in enumerate(zip(hw.tolist(), orig_hw.tolist(), strict=True)):
        _, _, px, py, nw, nh = letterbox_geometry(h, w, imgsz)
        out[i] = (nw / ow, nh / oh, px, py)
    return out


def build_batch(
    img: torch.Tensor,
    labels: list[tuple[np.ndarray, np.ndarray]],
    indices: list[int],
    valid: list[bool],
    data: SplitData,
    imgsz: int,
    train: bool,
) -> dict:
    """The batch dict (CPU tensors) from images (B,3,S,S) uint8 and per-sample (cls, yolo boxes)."""
    counts = [len(c) for c, _ in labels]
    n = sum(counts)
    cls = np.concatenate([c for c, _ in labels]).astype(np.float32).reshape(n, 1) if n else np.zeros((0, 1), np.float32)
    boxes = np.concatenate([b for _, b in labels]).astype(np.float32).reshape(n, 4) if n else np.zeros((0, 4), np.float32)
    bidx = np.repeat(np.arange(len(labels), dtype=np.float32), counts)
    la = data.labels
    idx = np.asarray(indices, dtype=np.int64)
    rp = ratio_pad(la.orig_hw[idx], la.hw[idx], imgsz) if not train else np.zeros((len(idx), 4), np.float32)
    return {
        "img": img,
        "batch_idx": torch.from_numpy(bidx),
        "cls": torch.from_numpy(cls),
        "bboxes": torch.from_numpy(boxes),
        "keys": [str(la.keys[i]) for i in idx],
        "im_file": [str(la.sources[i]) for i in idx],
        "ori_shape": [(int(h), int(w)) for h, w in la.orig_hw[idx].tolist()],
        "ratio_pad": torch.from_numpy(rp),
        "valid": torch.tensor(valid, dtype=torch.bool),
    }


def to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """Move every tensor of a batch to `device`."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
