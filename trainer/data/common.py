"""What both loader families share: opening a packed split, checksums, the batch form."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from packer.format import FormatError, LabelArrays, Manifest, SplitInfo
from packer.storage.files import hash_remote
from packer.storage.fs import ChecksumError, RemoteError, display_url, is_url, join, redact
from packer.storage.location import DatasetLocation
from trainer.config import pick_split
from trainer.data.shard_cache import cache_shards, url_key
from trainer.data.transforms import letterbox_geometry

log = logging.getLogger("trainer.data")


class DataError(FormatError):
    """The packed data cannot be loaded as asked (missing split, corrupt shard, ...); a ValueError."""


@dataclass
class SplitData:
    """A split of a packed dataset, opened from its manifest and cached label arrays.

    For a dataset on network storage (`url` set), `root` is the local shard cache of that
    dataset (`cache_dir/<hash of the URL>`): `shard_path(i)` is where `fetch` puts shard i.
    """

    root: Path
    manifest: Manifest
    name: str
    info: SplitInfo
    labels: LabelArrays
    key_index: dict[str, int] = field(repr=False)
    url: str | None = None
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    cache_dir: Path | None = None
    cache_max_bytes: int | None = None

    @property
    def remote(self) -> bool:
        return self.url is not None

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

    def fetch(self, shard_ids: Iterable[int]) -> None:
        """Make checksum-verified local copies of these shards (and their index files) in the
        cache, reusing copies already there; nothing to do for local data."""
        if self.url is None:
            return
        rels = [self.info.shards[i].path for i in sorted(set(shard_ids))]
        if not rels:
            return
        assert self.cache_dir is not None
        try:
            got = cache_shards(self.url, rels, self.cache_dir, self.storage_options, self.cache_max_bytes,
                               manifest=self.manifest)
        except ChecksumError as e:
            raise DataError(
                f"{display_url(self.url)}: a shard does not match the manifest's sha256 ({redact(str(e), self.storage_options)}): "
                "it is corrupt or was changed after packing; refusing to train on it (re-upload it with `packer push`)"
            ) from None
        except RemoteError as e:
            raise DataError(redact(str(e), self.storage_options)) from None
        except FileNotFoundError as e:
            raise DataError(f"{display_url(self.url)}: a shard listed in the manifest is missing ({e.filename or e})") from None
        except OSError as e:
            raise DataError(f"{display_url(self.url)}: cannot fetch shards ({redact(str(e), self.storage_options)})") from None
        for rel, local in got.items():  # cache_shards names files as shard_path does; keep it so
            if local != self.root / rel:
                raise RuntimeError(f"shard cache layout changed: {local} is not {self.root / rel}")


def default_cache_dir() -> Path:
    """Where shards read from network storage are cached: $XDG_CACHE_HOME/packer-trainer (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packer-trainer"


def open_split(
    shards: str | Path,
    split: str,
    *,
    verify: bool = False,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    cache_max_bytes: int | None = None,
) -> SplitData:
    """Read the manifest and `<split>/labels.npz`; with `verify`, check every shard's sha256.

    Never scans shards to count: all counts come from the manifest. `shards` may be a URL
    (s3://, gs://, http(s)://, ...: manifest and labels are read remotely, shards are only
    streamed or fetched later by the loader; file:// is read in place). `split` is picked by
    the trainer's rule (`trainer.config.pick_split`): the split itself, else the only one
    starting with it ("train" -> "train2017"), else for "train" the only split there is.
    """
    if is_url(shards) and str(shards).startswith("file://"):
        shards = _file_url_path(str(shards))
    so, where = dict(storage_options or {}), str(shards)
    shown = display_url(where) if is_url(where) else where
    try:
        loc = DatasetLocation(where, so)
        manifest = loc.manifest()
        split = pick_split(manifest.splits, "auto", split) or split
        if split not in manifest.splits:
            have = ", ".join(sorted(manifest.splits)) or "none"
            raise DataError(f"{loc.display}: no split {split!r} in the manifest (splits: {have})")
        info = manifest.splits[split]
        labels = loc.labels(split)
        if loc.path is not None:
            _check_listed_files(loc.path, info)
        if verify:  # streams every shard once: the copy there is what the manifest says
            _verify_shards(loc, info)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{shown}: not found ({redact(str(e), so)})") from None
    except (ValueError, OSError) as e:  # FormatError, RemoteError (no fsspec driver too), connection errors
        raise DataError.like(e, redact(str(e), so).replace(where, shown)) from None
    key_index = {str(k): i for i, k in enumerate(labels.keys.tolist())}
    if loc.path is not None:
        return SplitData(loc.path, manifest, split, info, labels, key_index)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return SplitData(cache / url_key(where, so), manifest, split, info, labels, key_index, url=where,
                     storage_options=so, cache_dir=cache, cache_max_bytes=cache_max_bytes)


def _file_url_path(url: str) -> Path:
    from urllib.parse import unquote, urlparse

    u = urlparse(url)
    if u.netloc not in ("", "localhost"):
        raise DataError(f"{url}: file:// URLs must name a local path (file:///path)")
    return Path(unquote(u.path))


def _check_listed_files(root: Path, info: SplitInfo) -> None:
    """Every shard and index file the manifest lists for the split is there (local data)."""
    for sh in info.shards:
        for p in [sh.path] + ([sh.index] if sh.index else []):
            if not (root / p).exists():
                raise DataError(f"{root / p}: listed in the manifest but missing")


def _verify_shards(loc: DatasetLocation, info: SplitInfo) -> None:
    """DataError unless every shard's sha256 equals the manifest's (each streamed once)."""
    for sh in info.shards:
        if loc.remote and loc.manifest().format == "lmdb":
            continue  # a remote lmdb shard is checked when it is fetched (cache_shards hashes it)
        digest, _ = hash_remote(loc.fs, join(loc.root, sh.path))
        if digest != sh.sha256:
            raise DataError(
                f"{loc.where_of(sh.path)}: checksum mismatch (sha256 {digest[:12]}..., manifest says {sh.sha256[:12]}...): "
                "the shard is corrupt or was changed after packing; refusing to train on it (re-pack or re-upload it, "
                "or run without verify)"
            )


def default_workers() -> int:
    """CPUs per process on this node (LOCAL_WORLD_SIZE processes share them), at most 8."""
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min((os.cpu_count() or 1) // local, 8))


def default_device(device: str | torch.device, rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is available, else cpu; a CUDA device that is not
    there is a DataError now (DALI would fail only at the first batch, with its own message)."""
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device == "auto":  # under torchrun, the process's own GPU; checked below like any other
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank % max(torch.cuda.device_count(), 1)))}"
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"device {device!r}: not a device name ('auto', 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "CUDA is not available"
        raise DataError(f"device {device!s}: {have} here; use 'auto' or 'cpu'")
    return dev


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


def keep_classes(batch: dict, classes: Any) -> dict:
    """ultralytics' `classes=[...]` for training and validation: only those classes' boxes stay labels (its
    datasets drop the others' labels and keep the images). Applied to the finished batch: each box is
    augmented on its own, so dropping the others afterwards gives the same labels."""
    if classes is None:
        return batch
    wanted = torch.as_tensor([classes] if isinstance(classes, int) else list(classes), dtype=batch["cls"].dtype)
    keep = torch.isin(batch["cls"].view(-1), wanted.to(batch["cls"].device))
    return {**batch, **{k: batch[k][keep] for k in ("cls", "bboxes", "batch_idx")}}
