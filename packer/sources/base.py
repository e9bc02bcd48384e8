"""What a source folder becomes: candidates (one per image found) and problems.

Discovery (main process) yields `Candidate`s; `packer.sample.process_candidate` (worker
processes) turns each into at most one `Record` plus `Problem`s. Every image found is one
candidate, so "images found = packed + skipped" holds by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
