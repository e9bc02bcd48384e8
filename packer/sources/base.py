"""What a source folder becomes: candidates (one per image found) and problems.

Discovery (main process) yields `Candidate`s; `packer.sample.process_candidate` (worker
processes) turns each into at most one `Record` plus `Problem`s. Every image found is one
candidate, so "images found = packed + skipped" holds by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Named reasons: the report's vocabulary. Images are skipped for IMAGE_REASONS, boxes
# dropped for BOX_REASONS; FIXES and WARNINGS change nothing that is counted as lost.
IMAGE_REASONS = (
    "empty_file",  # zero bytes
    "unreadable",  # decoder returned nothing
    "truncated",  # JPEG without EOI / PNG without IEND
    "missing_image",  # listed (json / txt list) but not on disk
    "path_outside_root",  # annotation path resolves outside the dataset root
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
)
FIXES = ("clipped",)  # box partly outside [0,1], clipped and kept
WARNINGS = ("size_mismatch",)  # COCO json width/height differ from the decoded image


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


class SourceError(ValueError):
    """The source folder cannot be read as a dataset; the message is one readable line."""


@dataclass
class Source:
    """A detected dataset: its layout, class names and the candidates of each split."""

    layout: str  # "coco" | "yolo-yaml" | "yolo-dirs" | "yolo-flat"
    root: Path  # dataset root (resolved); candidate.source is relative to it (posix)
    names: list[str]  # class names, index = class id
    splits: dict[str, list[Candidate]]  # split -> candidates sorted by .source
    notes: list[str] = field(default_factory=list)  # human notes about the detection

    @property
    def num_images(self) -> int:
        return sum(len(c) for c in self.splits.values())


def inside_root(root: Path, path: str) -> str | None:
    """Lexically normalized absolute `path` if it stays inside `root`, else None.

    Lexical on purpose: `..` and absolute paths from annotation files are what can escape;
    symlinks inside the dataset were placed by its owner and are followed."""
    p = os.path.normpath(os.path.join(root, path))
    r = os.fspath(root)
    return p if p == r or p.startswith(r.rstrip(os.sep) + os.sep) else None


def rel_posix(root: Path, path: str) -> str:
    """`path` relative to `root`, with forward slashes."""
    return Path(os.path.relpath(path, root)).as_posix()


def dedupe_sorted(cands: list[Candidate]) -> tuple[list[Candidate], int]:
    """Sort by source and keep the first of each source (same source = same sample key)."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for c in sorted(cands, key=lambda c: c.source):
        if c.source not in seen:
            seen.add(c.source)
            out.append(c)
    return out, len(cands) - len(out)
