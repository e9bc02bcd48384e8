"""`packer verify`: prove a packed folder is exactly what its manifest says.

Checks, per split: every shard's size and sha256; every index file equals the index
recomputed from its shard; record counts equal the manifest; every record's key, labels
and sizes equal the cached label arrays; `deep` also decodes every image strictly
(`images.decode_jpeg_strict`: a libjpeg warning, e.g. corrupt entropy-coded data, is an
error, reported with shard, position and key) and checks its size. Any single flipped byte
in a shard fails the sha256 check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer.format import FormatError, LabelArrays, Manifest, ShardInfo, sha256_file
from packer.progress import progress_bar
from packer.sources.base import safe_text
from packer.storage.fs import OversizeError
from packer.storage.location import DatasetLocation
from packer.writers import make_index, open_reader
from packer.writers.wds import foreign_members


@dataclass
class VerifyResult:
    root: Path | str  # a folder, or the URL of a remote dataset (credentials removed)
    errors: list[str] = field(default_factory=list)
    checked_shards: int = 0
    checked_records: int = 0
    decoded_images: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"root": str(self.root), "ok": self.ok, "errors": self.errors, "checked_shards": self.checked_shards,
                "checked_records": self.checked_records, "decoded_images": self.decoded_images}


def verify_dataset(
    root: str | os.PathLike, *, deep: bool = False, progress: bool = False, storage_options: dict[str, Any] | None = None
) -> VerifyResult:
    """Check a packed dataset (a folder, or a URL: s3://, http(s)://, ...) against its manifest;
    problems are collected, not raised. Remote shards are streamed one at a time into a temp file.

    A missing or invalid manifest raises FormatError (the folder is not a complete dataset).
    """
    loc = DatasetLocation(root, storage_options)
    res = VerifyResult(loc.display if loc.remote else Path(root))
    manifest = loc.manifest()
    total = sum(s.num_samples for s in manifest.splits.values())
    with progress_bar(total, "verifying", "rec", enabled=progress) as bar:
        for split in manifest.splits:
            _verify_split(loc, manifest, split, deep, res, bar)
    return res


def _verify_split(loc: DatasetLocation, m: Manifest, split: str, deep: bool, res: VerifyResult, bar) -> None:
    info = m.splits[split]
    labels = _split_labels(loc, m, split, res)
    by_shard = _positions(labels) if labels is not None else {}

    for n, sh in enumerate(info.shards):
        res.checked_shards += 1
        try:
            with loc.local_shard(sh) as (path, idx):
                _verify_shard(m, sh, path, idx, labels, by_shard.get(n, {}), deep, res, bar)
        except OversizeError as e:  # a remote shard or index longer than the shard may be: the download stopped
            res.errors.append(str(e))


def _verify_shard(m: Manifest, sh: ShardInfo, path: Path | None, idx: Path | None, labels: LabelArrays | None,
                  positions: dict[int, int], deep: bool, res: VerifyResult, bar) -> None:
    if path is None:
        res.errors.append(f"{sh.path}: missing")
        return
    size = path.stat().st_size
    if size != sh.bytes:
        res.errors.append(f"{sh.path}: {size} bytes, manifest says {sh.bytes}")
    damaged = size != sh.bytes or sha256_file(path) != sh.sha256
    if damaged and size == sh.bytes:
        res.errors.append(f"{sh.path}: sha256 mismatch (file changed or corrupt)")
    if sh.index and idx is None:
        res.errors.append(f"{sh.index}: missing")
    elif sh.index and not damaged:  # an index recomputed from a damaged shard proves nothing, and a
        try:                        # zero-filled tail would make it millions of entries long
            if idx.read_bytes() != make_index(m.format, path):
                res.errors.append(f"{sh.index}: does not match its shard (recomputed index differs)")
        except (FormatError, OSError) as e:
            res.errors.append(f"{sh.index}: cannot recompute index from {sh.path}: {e}")
    _verify_records(m.format, path, sh.path, sh.num_samples, labels, positions, deep, res, bar)
    if m.format == "wds" and (extra := foreign_members(path)):
        res.errors.append(f"{sh.path}: {len(extra)} tar member(s) packer never writes, first "
                          f"{safe_text(extra[0])[:80]!r} (links, folders or paths that `tar x` would create)")


def _split_labels(loc: DatasetLocation, m: Manifest, split: str, res: VerifyResult) -> LabelArrays | None:
    """The split's label arrays (class ids and shard numbers checked on load), compared with the
    manifest's counts; None (and an error) when they cannot be read."""
    info = m.splits[split]
    try:
        labels = loc.labels(split, check_count=False)
    except FormatError as e:
        res.errors.append(f"{split}: label arrays unreadable: {e}")
        return None
    if len(labels) != info.num_samples:
        res.errors.append(f"{split}: labels.npz has {len(labels)} samples, manifest says {info.num_samples}")
    if labels.class_counts(len(m.names)).tolist() != info.class_counts or len(labels.cls) != info.num_boxes:
        res.errors.append(f"{split}: class counts in labels.npz differ from the manifest")
    return labels


def _positions(labels: LabelArrays) -> dict[int, dict[int, int]]:
    """shard -> {pos -> sample index} from the label arrays."""
    out: dict[int, dict[int, int]] = {}
    for i, (s, p) in enumerate(zip(labels.shard.tolist(), labels.pos.tolist(), strict=True)):
        out.setdefault(s, {})[p] = i
    return out


def _verify_records(fmt: str, path: Path, rel: str, expected: int, labels: LabelArrays | None,
                    positions: dict[int, int], deep: bool, res: VerifyResult, bar) -> None:
    count = 0
    try:
        with open_reader(fmt, path) as reader:
            for pos, rec in enumerate(reader):
                count += 1
                if count > expected:  # a damaged tail can parse as millions of records: say so once
                    res.errors.append(f"{rel}: more records than the {expected} the manifest says")
                    return
                res.checked_records += 1
                bar.update(1)
                if labels is not None:
                    i = positions.get(pos)
                    if i is None:
                        res.errors.append(f"{rel}#{pos}: record {rec.key} is not in labels.npz")
                    else:
                        _compare(rel, pos, rec, labels, i, res)
                if deep:
                    _decode_check(rel, pos, rec, res)
    except (FormatError, OSError, ValueError) as e:  # named by the shard's own path, not a temp download's
        res.errors.append(f"{rel}: unreadable after {count} records: {str(e).replace(f'{path.parent}/', '')}")
        return
    if count != expected:
        res.errors.append(f"{rel}: {count} records, manifest says {expected}")
    if len(positions) != expected:
        res.errors.append(f"{rel}: labels.npz lists {len(positions)} samples for it, manifest says {expected}")


def _compare(rel: str, pos: int, rec, labels: LabelArrays, i: int, res: VerifyResult) -> None:
    cls, boxes = labels.labels(i)
    same = (
        rec.key == labels.keys[i] and rec.source == labels.sources[i]
        and (rec.height, rec.width) == tuple(labels.hw[i]) and (rec.orig_height, rec.orig_width) == tuple(labels.orig_hw[i])
        and np.array_equal(rec.cls, cls) and np.array_equal(rec.boxes, boxes)
    )
    if not same:
        res.errors.append(f"{rel}#{pos}: record {rec.key} differs from labels.npz")


def _decode_check(rel: str, pos: int, rec, res: VerifyResult) -> None:
    """Decode strictly (libjpeg warnings are errors: OpenCV would decode corrupt data silently)."""
    from packer.images import ImageError, decode_jpeg_strict

    res.decoded_images += 1
    try:
        img = decode_jpeg_strict(rec.jpeg)
    except ImageError as e:
        res.errors.append(f"{rel}#{pos}: image {rec.key} does not decode cleanly: {e.reason}: {e.detail}")
        return
    if img.shape[:2] != (rec.height, rec.width):
        res.errors.append(f"{rel}#{pos}: image {rec.key} is {img.shape[1]}x{img.shape[0]}, record says {rec.width}x{rec.height}")
