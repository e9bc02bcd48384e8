"""What a source folder becomes: candidates (one per image found) and problems.

Discovery (main process) yields `Candidate`s; `packer.sample.process_candidate` (worker
processes) turns each into at most one `Record` plus `Problem`s. Every image found is one
candidate, so "images found = packed + skipped" holds by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from packer.errors import PackerError

# Named reasons: the report's vocabulary. Images are skipped for IMAGE_REASONS, boxes
# dropped for BOX_REASONS; FIXES and WARNINGS change nothing that is counted as lost.
IMAGE_REASONS = (
    "empty_file",  # zero bytes
    "unreadable",  # no supported image format recognised, or the decoder returned nothing
    "truncated",  # JPEG without EOI / PNG without IEND
    "missing_image",  # listed (json / txt list) but not on disk
    "path_outside_root",  # annotation path resolves outside the dataset root
    "symlink_outside_root",  # image, its label file or its folder is a symlink leading outside the root
    "duplicate_image",  # listed twice (same COCO file_name / same list entry): packed once
    "too_large",  # more pixels than --max-pixels (read from the header, never decoded)
    "too_small",  # a side under 10 px (ultralytics skips those too)
)
BOX_REASONS = (
    "crowd",  # COCO iscrowd=1 (kept with --keep-crowd)
    "bad_line",  # non-numeric or wrong column count
    "non_finite",  # NaN / inf
    "class_out_of_range",
    "out_of_bounds",  # outside [0,1] and nothing valid left after clipping
    "zero_size",  # w or h <= 0
    "duplicate",  # exact duplicate of another box of the same image
    "image_skipped",  # the box's image was skipped
    "orphan_annotation",  # COCO annotation whose image_id matches no image
)
FIXES = ("clipped",)  # box partly outside [0,1], clipped and kept
# size_mismatch: COCO json width/height differ from the decoded image;
# multi_frame: a multi-page TIFF / animated image, its first frame packed
# corrupt_data: libjpeg warned while decoding a JPEG; packed as OpenCV decodes it, re-encoded
WARNINGS = ("size_mismatch", "multi_frame", "corrupt_data")


@dataclass
class Problem:
    kind: str  # "image" | "box" | "fix" | "warning"
    reason: str  # one of the tuples above
    source: str  # image path relative to the dataset root
    detail: str = ""  # human-readable: line number, values, ...
    count: int = 1  # e.g. 3 boxes lost with one skipped image


@dataclass
class Candidate:
    """One image found in a split; small and picklable (sent to worker processes)."""

    split: str
    source: str  # relative path (posix) under the dataset root: key + metadata
    path: str | None  # absolute image path; None when rejected at discovery
    # YOLO: path of the label .txt (None = no label file = background image)
    label_file: str | None = None
    # COCO: (class_index, x, y, w, h, iscrowd) in json pixels, top-left xywh
    coco_boxes: list[tuple[int, float, float, float, float, int]] | None = None
    coco_size: tuple[int, int] | None = None  # (height, width) from the json
    reject: str | None = None  # an IMAGE_REASONS entry when discovery already knows
    detail: str = ""
    problems: list[Problem] = field(default_factory=list)  # found during discovery
    # YOLO pose (data.yaml `kpt_shape`): label lines hold 5 + prod(kpt_shape) columns
    kpt_shape: tuple[int, int] | None = None


class SourceError(PackerError, ValueError):
    """The source folder cannot be read as a dataset; the message is one readable line."""

    def __init__(self, message: str) -> None:
        super().__init__(safe_text(" ".join(str(message).splitlines())))  # printable whatever the file names


@dataclass
class Source:
    """A detected dataset: its layout, class names and the candidates of each split."""

    layout: str  # "coco" | "yolo-yaml" | "yolo-dirs" | "yolo-flat"
    root: Path  # dataset root (resolved); candidate.source is relative to it (posix)
    names: list[str]  # class names, index = class id
    splits: dict[str, list[Candidate]]  # split -> candidates sorted by .source
    notes: list[str] = field(default_factory=list)  # human notes about the detection


def inside_root(root: Path, path: str) -> str | None:
    """Lexically normalized absolute `path` if it stays inside `root`, else None.

    Lexical on purpose: `..` and absolute paths from annotation files are what can escape
    here; where symlinks lead is checked apart (`packer.sources.walk.Scope`)."""
    p = os.path.normpath(os.path.join(root, path))
    r = os.fspath(root)
    return p if p == r or p.startswith(r.rstrip(os.sep) + os.sep) else None


def safe_text(s: str) -> str:
    """`s` as valid UTF-8 text, for keys, reports and manifests.

    A file name that is not UTF-8 reaches Python as a str with surrogate escapes (PEP 383):
    its bytes are re-encoded and each undecodable byte is written as `\\xNN`, so
    `images/caf\\xe9.jpg` names the file whose name holds the byte 0xE9. Other lone surrogates
    (e.g. from a JSON `\\udXXX` escape) become `\\udXXX`."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def rel_posix(root: Path, path: str) -> str:
    """`path` relative to `root`, with forward slashes, as valid UTF-8 text (see safe_text)."""
    return safe_text(Path(os.path.relpath(path, root)).as_posix())


def dedupe_sorted(cands: list[Candidate]) -> tuple[list[Candidate], int]:
    """Sort by source (stable); every later entry with the source of an earlier one (same
    source = same sample key) stays, rejected as "duplicate_image", so it is counted and its
    boxes with it. Returns (candidates, number of duplicates)."""
    out = sorted(cands, key=lambda c: c.source)
    seen: set[str] = set()
    dup = 0
    for c in out:
        if c.source in seen and c.reject != "duplicate_image":
            dup += 1
            c.path, c.reject, c.detail = None, "duplicate_image", "listed again; the first entry is packed"
        seen.add(c.source)
    return out, dup
