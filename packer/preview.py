"""`packer preview`: a grid image of packed samples with their boxes and class names.

- Stored images (default): records are read with packer's own shard readers and drawn with
  OpenCV, so the preview runs from a base `packer` install. torch and ultralytics are not
  imported on this path on purpose: packer stays light for jobs that only pack.
- ``augment=True``: the first training batch of the trainer's loader (`trainer.data.make_loader`,
  the augmentation training uses), drawn with ultralytics' `plot_images` as ``train_batch*.jpg``
  are. This needs the ``[train]`` extra.

Layout of the stored-image grid (what a test can compute): the samples in the order they lie in the
shards, row by row in ``ceil(sqrt(k))`` columns; square tiles of ``min(imgsz, 1920 // columns)``
pixels with a ``GAP``-pixel white gap between them; each image letterboxed (aspect kept, centred on
grey 114); boxes in ultralytics' class colours.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from packer.errors import DATA, PackerError
from packer.format import FormatError, Manifest, Record, ShardInfo, atomic_write_bytes
from packer.images import ImageError, decode_jpeg_strict
from packer.storage.fs import RemoteError, display_url, redact
from packer.storage.location import DatasetLocation
from packer.writers import open_reader

__all__ = ["GAP", "MAX_SIZE", "PALETTE", "PreviewDataError", "PreviewError", "pick_samples", "tile_layout",
           "write_preview"]

GAP = 2  # white pixels between tiles
MAX_SIZE = 1920  # widest grid, as ultralytics' plot_images
# ultralytics' class colours (RGB, ultralytics.utils.plotting.Colors), so both kinds of preview agree
PALETTE = [(4, 42, 255), (11, 219, 235), (243, 243, 243), (0, 223, 183), (17, 31, 104), (255, 111, 221),
           (255, 68, 79), (204, 237, 0), (0, 243, 68), (189, 0, 255), (0, 180, 255), (221, 0, 186),
           (0, 255, 255), (38, 192, 0), (1, 255, 179), (125, 36, 255), (123, 0, 104), (255, 27, 108),
           (252, 109, 47), (162, 255, 11)]
_TRAIN_EXTRA = "--augment needs the training stack: pip install 'packer-trainer[train]'"


class PreviewError(PackerError, ValueError):
    """The preview cannot be made as asked (bad option, not a packed dataset, missing split): a usage error."""


class PreviewDataError(PreviewError):
    """A shard or stored image could not be read (corrupt, checksum mismatch, unreachable): a data error."""

    exit_code = DATA


def write_preview(shards: str, out: str = "preview.jpg", *, split: str | None = None, n: int = 16, seed: int = 0,
                  augment: bool = False, imgsz: int = 640, storage_options: dict | None = None) -> Path:
    """Draw `n` samples of `split` (default: train, train*, else the first split) of the packed
    dataset at `shards` (folder or URL, any format) with boxes and class names; write a JPEG
    grid to `out` atomically and return its path. `seed` picks the samples (and the augmentation)."""
    if not isinstance(n, int) or n < 1:
        raise PreviewError(f"-n must be a positive number of samples, got {n!r}")
    if not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32:
        raise PreviewError(f"--imgsz must be a positive multiple of 32, got {imgsz!r}")
    target = Path(out)
    if target.suffix.lower() not in (".jpg", ".jpeg") or target.is_dir():
        raise PreviewError(f"-o {out}: the preview is a JPEG file: give a name ending in .jpg")
    loc = _location(shards, storage_options)
    m = loc.manifest()
    split = _choose_split(m, split)
    if m.splits[split].num_samples == 0:
        raise PreviewError(f"split {split!r} has no samples")
    _check_labels(loc, split, storage_options)
    if augment:
        n = min(n, m.splits[split].num_samples)  # one training batch of n samples
        grid = _augmented_grid(str(shards), split, n, seed, imgsz, storage_options)
    else:
        records = list(_read_records(str(shards), m, split, n, seed, storage_options))
        grid = _stored_grid(records, m.names, imgsz)
    # full-resolution colour (4:4:4, as ultralytics saves plots): thin box outlines keep their class colour
    ok, buf = cv2.imencode(".jpg", grid, [cv2.IMWRITE_JPEG_QUALITY, 95,
                                          cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise PreviewError("OpenCV could not encode the preview")
    return atomic_write_bytes(target, buf.tobytes())


# ----------------------------------------------------------------------------- choosing and reading


def _location(shards: str, storage_options: dict | None) -> DatasetLocation:
    """The dataset with its manifest read (PreviewError, exit 2, if there is none to read)."""
    try:
        loc = DatasetLocation(shards, storage_options)
        loc.manifest()
        return loc
    except (FormatError, RemoteError, OSError) as e:
        msg = redact(str(e), storage_options)
        raise PreviewError(msg.replace(str(shards), display_url(str(shards)))) from None


def _check_labels(loc: DatasetLocation, split: str, storage_options: dict | None) -> None:
    """The split's label arrays must load as training loads them, though the stored grid draws the
    records' own boxes: a preview must not pass a dataset the trainer refuses (exit 1)."""
    try:
        loc.labels(split)
    except (FormatError, RemoteError, OSError) as e:
        raise PreviewDataError(redact(str(e), storage_options)) from None


def _choose_split(m: Manifest, split: str | None) -> str:
    if split is not None:
        if split not in m.splits:
            raise PreviewError(f"no split {split!r} (splits: {', '.join(sorted(m.splits)) or 'none'})")
        return split
    if "train" in m.splits:
        return "train"
    train = [s for s in m.splits if s.startswith("train")]
    if len(train) == 1:
        return train[0]
    if not m.splits:
        raise PreviewError("the dataset has no splits")
    return sorted(m.splits)[0]


def pick_samples(shard_sizes: list[int], n: int, seed: int) -> list[tuple[int, int]]:
    """(shard, position) of `n` samples, in shard order: shards are taken in a seeded random order
    until they hold `n` samples (packing shuffles, so any shard is a random draw, and a URL
    downloads only those shards), then `n` positions are drawn among them."""
    rng = np.random.default_rng(seed)
    chosen, have = [], 0
    for s in rng.permutation(len(shard_sizes)).tolist():
        if have >= n:
            break
        if shard_sizes[s]:
            chosen.append(s)
            have += shard_sizes[s]
    pool = [(s, p) for s in sorted(chosen) for p in range(shard_sizes[s])]
    take = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
    return [pool[i] for i in take.tolist()]


def _read_records(shards: str, m: Manifest, split: str, n: int, seed: int,
                  storage_options: dict | None) -> Iterator[Record]:
    info = m.splits[split]
    wanted: dict[int, list[int]] = {}
    for s, p in pick_samples([sh.num_samples for sh in info.shards], n, seed):
        wanted.setdefault(s, []).append(p)
    for s, positions in wanted.items():
        with _local_shard(shards, info.shards[s], storage_options) as path:
            try:
                with open_reader(m.format, path) as reader:
                    for p in positions:
                        yield reader.read(p)
            except (FormatError, OSError) as e:
                raise PreviewDataError(f"{info.shards[s].path}: cannot read ({e})") from None


@contextmanager
def _local_shard(shards: str, sh: ShardInfo, storage_options: dict | None) -> Iterator[Path]:
    """The shard (and its index) as local files: in place for a folder, a checked temp copy for a URL."""
    where = f"{display_url(shards)}/{sh.path}"
    with ExitStack() as stack:
        try:
            path, _ = stack.enter_context(DatasetLocation(shards, storage_options).local_shard(sh, checked=True))
        except (OSError, ValueError) as e:  # RemoteError, ChecksumError: unreachable or corrupt
            raise PreviewDataError(f"{where}: {redact(str(e), storage_options)}") from None
        if path is None:
            raise PreviewDataError(f"{where}: not found")
        yield path


# ----------------------------------------------------------------------------- drawing (OpenCV)


def tile_layout(k: int, imgsz: int) -> tuple[int, int, int]:
    """(columns, rows, tile size in pixels) of the grid for `k` samples."""
    cols = math.ceil(math.sqrt(k))
    return cols, math.ceil(k / cols), max(32, min(imgsz, MAX_SIZE // cols))


def _stored_grid(records: list[Record], names: list[str], imgsz: int) -> np.ndarray:
    cols, rows, t = tile_layout(len(records), imgsz)
    grid = np.full((rows * t + (rows - 1) * GAP, cols * t + (cols - 1) * GAP, 3), 255, np.uint8)
    for i, rec in enumerate(records):
        y, x = (i // cols) * (t + GAP), (i % cols) * (t + GAP)
        grid[y:y + t, x:x + t] = _tile(rec, t, names)
    return grid


def _tile(rec: Record, t: int, names: list[str]) -> np.ndarray:
    """One sample letterboxed into a t x t BGR tile with its boxes, class names and source file name."""
    try:  # strict: a damaged record (LMDB and tar hold no per-record checksum) is an error, not a garbled tile
        img = decode_jpeg_strict(rec.jpeg)
    except ImageError as e:
        raise PreviewDataError(f"{rec.key}: the stored JPEG does not decode cleanly ({e.reason}); "
                               "run packer verify --deep") from None
    h, w = img.shape[:2]
    r = t / max(h, w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    x0, y0 = (t - nw) // 2, (t - nh) // 2
    tile = np.full((t, t, 3), 114, np.uint8)
    tile[y0:y0 + nh, x0:x0 + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    lw = max(2, round(t / 160))
    scale = max(0.3, t / 640)
    for c, (cx, cy, bw, bh) in zip(rec.cls.tolist(), rec.boxes.tolist(), strict=True):
        p1 = (round(x0 + (cx - bw / 2) * nw), round(y0 + (cy - bh / 2) * nh))
        p2 = (round(x0 + (cx + bw / 2) * nw), round(y0 + (cy + bh / 2) * nh))
        color = PALETTE[c % len(PALETTE)][::-1]  # RGB -> BGR
        cv2.rectangle(tile, p1, p2, color, lw)
        _label(tile, names[c] if 0 <= c < len(names) else str(c), p1, color, scale)
    _text(tile, Path(rec.source).name[:40], (3, t - 4), scale * 0.8)
    return tile


def _label(img: np.ndarray, text: str, corner: tuple[int, int], color: tuple[int, ...], scale: float) -> None:
    """Class name on a filled box of the class colour, just above the box's top-left corner (inside if no room)."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = corner
    top = y - th - base - 2 if y - th - base - 2 >= 0 else y
    cv2.rectangle(img, (x, top), (x + tw + 2, top + th + base + 2), color, -1)
    ink = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
    cv2.putText(img, text, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, 1, cv2.LINE_AA)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float) -> None:
    """White text on a black band (a thicker black copy as outline would advance wider per glyph)."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 1, y - th - 2), (x + tw + 1, y + base), (0, 0, 0), -1)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


# ----------------------------------------------------------------------------- augmented (trainer + ultralytics)


def _augmented_grid(shards: str, split: str, n: int, seed: int, imgsz: int, storage_options: dict | None) -> np.ndarray:
    """The first training batch of `make_loader` (mosaic, affine, HSV, flip), drawn by ultralytics' plot_images."""
    try:
        from trainer.offline import setup_offline

        setup_offline()  # fonts and settings before ultralytics is imported: nothing is downloaded
        from ultralytics.utils.plotting import plot_images

        from trainer.data import make_loader
    except ImportError:
        raise PreviewError(_TRAIN_EXTRA) from None
    try:
        loader = make_loader(shards, split, loader="torch", imgsz=imgsz, batch=n, train=True, seed=seed, workers=0,
                             device="cpu", storage_options=storage_options)
    except PackerError as e:  # DataError, LoaderError, SplitError: the data cannot be loaded as asked
        raise PreviewError.like(e, str(e)) from None
    try:
        batch: dict[str, Any] = next(iter(loader))
    finally:
        loader.close()
    rgb = plot_images(labels=batch, paths=batch["im_file"], names=dict(enumerate(loader.names)), max_subplots=n,
                      save=False, threaded=False)
    return np.ascontiguousarray(np.asarray(rgb)[..., ::-1])
